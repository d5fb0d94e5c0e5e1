//! The server side of the k3s agent tunnel: `GET /v1-k3s/connect`, a WebSocket carrying a
//! rancher/remotedialer session (server.go, session.go, session_serve.go,
//! session_sync.go, connection.go, readbuffer.go, back_pressure.go, message.go,
//! wsconn.go), as k3s's supervisor serves it (pkg/daemons/control/tunnel.go,
//! pkg/server/handlers/router.go, pkg/server/auth/auth.go).
//!
//! Frames are binary WebSocket messages: Go `binary.PutVarint` (zigzag) varints id,
//! connID and type, a fourth varint (a deadline, unused) for Data and Connect, then the
//! payload. The server dials through a session (Connect `tcp/ADDRESS`), reads what the
//! agent sends into a read buffer that pauses the agent above [`MAX_BUFFER`] bytes, and
//! stops writing a connection the agent paused. Anything the server cannot decode, a
//! text message, and a Connect from the agent (a server session has no connect
//! authorizer) end the session, as `Session.Serve` returns then. So does silence: the
//! read deadline is 60 s, renewed only by the agent's pings and pongs (wsconn.go).
//! Back-pressure keeps back_pressure.go's single `paused` flag per connection: the
//! agent's Pause stops the server's writes, and so does the server's own full read
//! buffer; any read that leaves less than [`MAX_BUFFER`]/8 buffered while that flag is
//! set sends Resume and clears it, whoever set it.
//!
//! Where the fake differs: after `Serve` returns, remotedialer leaves the hijacked
//! connection to the garbage collector; the fake closes it at once. Pongs echo the
//! ping's payload (tungstenite answers pings itself) where gorilla sends an empty one.
//! The read buffer of one connection is bounded at four times [`MAX_BUFFER`] (the
//! connection is closed with an error beyond that; remotedialer only logs), a session
//! queues at most [`QUEUE`] outgoing messages, a node keeps at most
//! [`MAX_SESSIONS_PER_NODE`] sessions on one frontend, and a WebSocket message may be at
//! most 64 MiB (tungstenite's default; gorilla sets no limit here). Message IDs count up
//! per frontend from a time-seeded start (Go: one process-wide counter from a random
//! start).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::{CancellationToken, PollSender};

/// Message types (message.go).
pub mod kind {
    pub const DATA: i64 = 1;
    pub const CONNECT: i64 = 2;
    pub const ERROR: i64 = 3;
    pub const ADD_CLIENT: i64 = 4;
    pub const REMOVE_CLIENT: i64 = 5;
    pub const PAUSE: i64 = 6;
    pub const RESUME: i64 = 7;
    pub const SYNC_CONNECTIONS: i64 = 8;
}

/// readbuffer.go: above this many buffered bytes the agent is paused; it is resumed
/// when the buffer drains below an eighth of it.
pub const MAX_BUFFER: usize = 1 << 21;
/// The fake's own bound on one connection's read buffer.
const HARD_BUFFER: usize = 4 * MAX_BUFFER;
/// wsconn.go: the read deadline, renewed by every ping and pong the agent sends.
const PING_WAIT: Duration = Duration::from_secs(60);
/// types.go: how long writing an Error may take.
const SEND_ERROR_TIMEOUT: Duration = Duration::from_secs(5);
/// session.go `defaultDeadline`: how long writing a Connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// message.go: the value of the unused deadline field.
const LEGACY_DEADLINE: i64 = 15_000;
/// Outgoing messages one session queues.
pub const QUEUE: usize = 256;
/// One Data message carries at most this much of a write.
const MAX_DATA: usize = 64 * 1024;
pub const MAX_SESSIONS_PER_NODE: usize = 64;
/// What [`TunnelLog`] keeps per node, and of how many nodes.
pub const LOG_LIMIT: usize = 10_000;
const LOG_NODES: usize = 1024;
/// How much of a received payload the log keeps.
pub const LOGGED_PAYLOAD: usize = 4096;
/// message.go: how much of an Error, Connect, AddClient or RemoveClient payload is read.
const ERROR_READ: usize = 100;
const CONNECT_READ: usize = 266;

/// One message the server received from an agent, decoded as `newServerMessage` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelMessage {
    pub id: i64,
    pub conn_id: i64,
    /// The message type (see [`kind`]); 0 when not decoded.
    pub kind: i64,
    /// What follows the header (and, for Data and Connect, the deadline field), at most
    /// [`LOGGED_PAYLOAD`] bytes of it; for an undecodable frame, the raw frame.
    pub payload: Vec<u8>,
    /// The full length of that payload.
    pub payload_len: usize,
    /// Why the frame could not be decoded, or `text message` for a text frame; the
    /// session ended there.
    pub error: Option<String>,
}

/// Every message received per node (client key), over all frontends, bounded.
#[derive(Default)]
pub struct TunnelLog {
    nodes: Mutex<BTreeMap<String, VecDeque<TunnelMessage>>>,
}

impl TunnelLog {
    fn push(&self, node: &str, message: TunnelMessage) {
        let mut nodes = self.nodes.lock().expect("tunnel log");
        if !nodes.contains_key(node) && nodes.len() >= LOG_NODES {
            return;
        }
        let log = nodes.entry(node.to_string()).or_default();
        log.push_back(message);
        while log.len() > LOG_LIMIT {
            log.pop_front();
        }
    }

    pub fn of(&self, node: &str) -> Vec<TunnelMessage> {
        let nodes = self.nodes.lock().expect("tunnel log");
        nodes
            .get(node)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Go's `binary.PutVarint`.
pub fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut ux = (value as u64) << 1;
    if value < 0 {
        ux = !ux;
    }
    while ux >= 0x80 {
        out.push(ux as u8 | 0x80);
        ux >>= 7;
    }
    out.push(ux as u8);
}

/// Go's `binary.ReadVarint` over a byte slice, with its errors.
pub fn read_varint(bytes: &[u8], pos: &mut usize) -> Result<i64, String> {
    let mut x: u64 = 0;
    let mut shift = 0;
    for i in 0..10 {
        let Some(&b) = bytes.get(*pos) else {
            return Err(if i > 0 { "unexpected EOF" } else { "EOF" }.into());
        };
        *pos += 1;
        if b < 0x80 {
            if i == 9 && b > 1 {
                return Err("binary: varint overflows a 64-bit integer".into());
            }
            x |= u64::from(b) << shift;
            let mut value = (x >> 1) as i64;
            if x & 1 != 0 {
                value = !value;
            }
            return Ok(value);
        }
        x |= u64::from(b & 0x7f) << shift;
        shift += 7;
    }
    Err("binary: varint overflows a 64-bit integer".into())
}

/// A message as the server writes it (`message.Bytes`).
pub fn encode(id: i64, conn_id: i64, kind: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + payload.len());
    put_varint(&mut out, id);
    put_varint(&mut out, conn_id);
    put_varint(&mut out, kind);
    if kind == kind::DATA || kind == kind::CONNECT {
        put_varint(&mut out, LEGACY_DEADLINE);
    }
    out.extend_from_slice(payload);
    out
}

/// A decoded message: header, and the rest of the frame.
struct Decoded<'a> {
    id: i64,
    conn_id: i64,
    kind: i64,
    body: &'a [u8],
}

/// `newServerMessage`: the header, and the deadline field of Data and Connect.
fn decode(frame: &[u8]) -> Result<Decoded<'_>, String> {
    let mut pos = 0;
    let id = read_varint(frame, &mut pos)?;
    let conn_id = read_varint(frame, &mut pos)?;
    let kind = read_varint(frame, &mut pos)?;
    if kind == kind::DATA || kind == kind::CONNECT {
        read_varint(frame, &mut pos)?;
    }
    Ok(Decoded {
        id,
        conn_id,
        kind,
        body: &frame[pos..],
    })
}

/// What ended a connection, as its reader sees it.
#[derive(Debug, Clone)]
enum ConnError {
    Eof,
    Other(String),
}

impl ConnError {
    /// How an Error message's text is read (`message.Err`).
    fn from_text(text: &str) -> ConnError {
        if text == "EOF" {
            ConnError::Eof
        } else {
            ConnError::Other(text.to_string())
        }
    }

    fn text(&self) -> String {
        match self {
            ConnError::Eof => "EOF".into(),
            ConnError::Other(text) => text.clone(),
        }
    }
}

#[derive(Default)]
struct ConnState {
    /// readBuffer.buf.
    buf: VecDeque<u8>,
    /// readBuffer.err.
    err: Option<ConnError>,
    /// connection.closed: writes fail.
    closed: bool,
    /// backPressure.paused: one flag for both directions, as in back_pressure.go
    /// (set by the agent's Pause and by our own full buffer).
    paused: bool,
    /// backPressure.closed.
    bp_closed: bool,
    /// A Resume decided on but not yet queued (the queue was full).
    resume_owed: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

struct Conn {
    id: i64,
    state: Mutex<ConnState>,
}

impl Conn {
    fn wake(state: &mut ConnState) {
        if let Some(w) = state.read_waker.take() {
            w.wake();
        }
        if let Some(w) = state.write_waker.take() {
            w.wake();
        }
    }

    /// `doTunnelClose`: no more writes; readers get what is buffered, then `err`.
    fn do_tunnel_close(&self, err: ConnError) -> bool {
        let mut state = self.state.lock().expect("conn");
        if state.closed {
            return false;
        }
        state.closed = true;
        if state.err.is_none() {
            state.err = Some(err);
        }
        Conn::wake(&mut state);
        true
    }
}

/// One agent's WebSocket: its connections and the queue to its writer.
pub struct Session {
    client_key: String,
    session_key: i64,
    next_conn_id: AtomicI64,
    conns: Mutex<BTreeMap<i64, Arc<Conn>>>,
    out: mpsc::Sender<Vec<u8>>,
    ids: Arc<AtomicI64>,
    /// Ends the session at once, without a close frame.
    kill: CancellationToken,
}

impl Session {
    fn next_id(&self) -> i64 {
        self.ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn message(&self, conn_id: i64, kind: i64, payload: &[u8]) -> Vec<u8> {
        encode(self.next_id(), conn_id, kind, payload)
    }

    /// Queues a message without waiting; if the queue is full, a task waits for room
    /// (up to [`SEND_ERROR_TIMEOUT`]).
    fn send_soon(&self, frame: Vec<u8>) {
        match self.out.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                let out = self.out.clone();
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let _ = tokio::time::timeout(SEND_ERROR_TIMEOUT, out.send(frame)).await;
                    });
                }
            }
        }
    }

    async fn send(&self, frame: Vec<u8>, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.out.send(frame)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("use of closed network connection".into()),
            Err(_) => Err("i/o timeout".into()),
        }
    }

    /// `serverConnect`: a new connection ID, a Connect message, and the connection
    /// (usable at once: remotedialer does not wait for the agent's dial).
    pub async fn dial(self: &Arc<Self>, proto: &str, address: &str) -> Result<TunnelConn, String> {
        let id = self.next_conn_id.fetch_add(1, Ordering::SeqCst) + 1;
        let conn = Arc::new(Conn {
            id,
            state: Mutex::new(ConnState::default()),
        });
        self.conns.lock().expect("conns").insert(id, conn.clone());
        let connect = self.message(id, kind::CONNECT, format!("{proto}/{address}").as_bytes());
        if let Err(e) = self.send(connect, CONNECT_TIMEOUT).await {
            self.close_connection(id, ConnError::Other(e.clone()));
            return Err(e);
        }
        Ok(TunnelConn {
            conn,
            session: self.clone(),
            writer: PollSender::new(self.out.clone()),
            reader: PollSender::new(self.out.clone()),
        })
    }

    /// `closeConnection`: forget it, tell the agent (`writeErr`), close it.
    fn close_connection(&self, id: i64, err: ConnError) {
        let conn = self.conns.lock().expect("conns").remove(&id);
        if let Some(conn) = conn {
            self.send_soon(self.message(id, kind::ERROR, err.text().as_bytes()));
            conn.do_tunnel_close(err);
        }
    }

    fn connection(&self, id: i64) -> Option<Arc<Conn>> {
        self.conns.lock().expect("conns").get(&id).cloned()
    }

    /// `Session.Close`, when the session ends: every connection gets "tunnel disconnect".
    fn close(&self) {
        let conns = std::mem::take(&mut *self.conns.lock().expect("conns"));
        for (id, conn) in conns {
            self.send_soon(self.message(id, kind::ERROR, b"tunnel disconnect"));
            conn.do_tunnel_close(ConnError::Other("tunnel disconnect".into()));
        }
    }

    /// `serveMessage`. An error ends the session.
    async fn serve_message(&self, frame: &[u8]) -> Result<(), String> {
        let message = decode(frame)?;
        match message.kind {
            kind::CONNECT => {
                let body = &message.body[..message.body.len().min(CONNECT_READ)];
                if !String::from_utf8_lossy(body).contains('/') {
                    return Err("failed to parse connect address".into());
                }
                // A server session has no ConnectAuthorizer.
                Err("connect not allowed".into())
            }
            kind::ADD_CLIENT | kind::REMOVE_CLIENT => {
                // parseAddress: "clientKey/sessionKey"; a server session keeps these only
                // for peers, which the fake has none of.
                let body = &message.body[..message.body.len().min(ERROR_READ)];
                let text = String::from_utf8_lossy(body).into_owned();
                match text.split_once('/') {
                    None => Err(format!("invalid remote Session {text}: not / separated")),
                    Some((_, key)) => match key.parse::<i64>() {
                        Ok(_) => Ok(()),
                        Err(_) => Err(format!(
                            "invalid remote Session {text}: strconv.Atoi: parsing {key:?}: invalid syntax"
                        )),
                    },
                }
            }
            kind::SYNC_CONNECTIONS => {
                if message.body.len() % 8 != 0 {
                    return Err("decoding sync connections payload: incorrect data format".into());
                }
                let listed: Vec<i64> = message
                    .body
                    .chunks(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as i64)
                    .collect();
                self.sync_connections(&listed);
                Ok(())
            }
            kind::DATA => {
                self.connection_data(message.conn_id, message.body).await;
                Ok(())
            }
            kind::PAUSE | kind::RESUME => {
                if let Some(conn) = self.connection(message.conn_id) {
                    let mut state = conn.state.lock().expect("conn");
                    state.paused = message.kind == kind::PAUSE;
                    if let Some(w) = state.write_waker.take() {
                        w.wake();
                    }
                }
                Ok(())
            }
            kind::ERROR => {
                let body = &message.body[..message.body.len().min(ERROR_READ)];
                let err = ConnError::from_text(&String::from_utf8_lossy(body));
                self.close_connection(message.conn_id, err);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// `compareAndCloseStaleConnections`: every connection the agent did not list is
    /// closed, without an Error message. The comparison is `diffSortedSetsGetRemoved`,
    /// which takes the agent's list to be sorted (remotedialer clients sort it); an
    /// unsorted list is walked as Go walks it.
    fn sync_connections(&self, listed: &[i64]) {
        let stale: Vec<Arc<Conn>> = {
            let mut conns = self.conns.lock().expect("conns");
            let ours: Vec<i64> = conns.keys().copied().collect();
            let (mut i, mut j) = (0, 0);
            let mut removed = vec![];
            while i < ours.len() && j < listed.len() {
                match ours[i].cmp(&listed[j]) {
                    std::cmp::Ordering::Less => {
                        removed.push(ours[i]);
                        i += 1;
                    }
                    std::cmp::Ordering::Greater => j += 1,
                    std::cmp::Ordering::Equal => {
                        i += 1;
                        j += 1;
                    }
                }
            }
            removed.extend_from_slice(&ours[i..]);
            removed.iter().filter_map(|id| conns.remove(id)).collect()
        };
        for conn in stale {
            conn.do_tunnel_close(ConnError::Other("sync from client".into()));
        }
    }

    /// `connectionData`: into the connection's read buffer, pausing the agent when it
    /// holds more than [`MAX_BUFFER`]; for an unknown connection, an Error.
    async fn connection_data(&self, id: i64, body: &[u8]) {
        let Some(conn) = self.connection(id) else {
            let text = format!(
                "connection not found {}/{}/{id}",
                self.client_key, self.session_key
            );
            let _ = self
                .send(
                    self.message(id, kind::ERROR, text.as_bytes()),
                    CONNECT_TIMEOUT,
                )
                .await;
            return;
        };
        let (pause, overflow) = {
            let mut state = conn.state.lock().expect("conn");
            if state.err.is_some() {
                (false, false)
            } else if state.buf.len() + body.len() > HARD_BUFFER {
                (false, true)
            } else {
                state.buf.extend(body);
                if !body.is_empty() {
                    if let Some(w) = state.read_waker.take() {
                        w.wake();
                    }
                }
                let pause = state.buf.len() > MAX_BUFFER && !state.paused;
                if pause {
                    state.paused = true;
                }
                (pause, false)
            }
        };
        if overflow {
            self.close_connection(
                id,
                ConnError::Other(format!(
                    "remotedialer buffer exceeded, length: {HARD_BUFFER}"
                )),
            );
        } else if pause {
            let _ = self
                .send(self.message(id, kind::PAUSE, &[]), SEND_ERROR_TIMEOUT)
                .await;
        }
    }
}

/// A connection dialed through a session: what the agent sends, and what is written
/// to it as Data messages. Dropping or shutting it down closes it (an Error "EOF").
pub struct TunnelConn {
    conn: Arc<Conn>,
    session: Arc<Session>,
    writer: PollSender<Vec<u8>>,
    reader: PollSender<Vec<u8>>,
}

impl TunnelConn {
    pub fn id(&self) -> i64 {
        self.conn.id
    }

    fn closed_pipe() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "io: read/write on closed pipe")
    }
}

impl AsyncRead for TunnelConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A Resume that did not fit in the queue goes first, as Go's read blocks on it.
        let owed = this.conn.state.lock().expect("conn").resume_owed;
        if owed {
            match this.reader.poll_reserve(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {
                    let resume = this.session.message(this.conn.id, kind::RESUME, &[]);
                    let _ = this.reader.send_item(resume);
                }
                Poll::Ready(Err(_)) => {}
            }
            let mut state = this.conn.state.lock().expect("conn");
            state.resume_owed = false;
            state.paused = false;
            if let Some(w) = state.write_waker.take() {
                w.wake();
            }
        }
        let mut state = this.conn.state.lock().expect("conn");
        if state.buf.is_empty() {
            return match &state.err {
                Some(ConnError::Eof) => Poll::Ready(Ok(())),
                Some(ConnError::Other(text)) => Poll::Ready(Err(io::Error::other(text.clone()))),
                None => {
                    state.read_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            };
        }
        let n = out.remaining().min(state.buf.len());
        let (a, b) = state.buf.as_slices();
        let from_a = n.min(a.len());
        out.put_slice(&a[..from_a]);
        out.put_slice(&b[..n - from_a]);
        state.buf.drain(..n);
        if state.buf.len() < MAX_BUFFER / 8 && state.paused && !state.resume_owed {
            // backPressure.Resume: only if paused (by either side).
            state.resume_owed = true;
            drop(state);
            if let Poll::Ready(Ok(())) = this.reader.poll_reserve(cx) {
                let resume = this.session.message(this.conn.id, kind::RESUME, &[]);
                let _ = this.reader.send_item(resume);
                let mut state = this.conn.state.lock().expect("conn");
                state.resume_owed = false;
                state.paused = false;
                if let Some(w) = state.write_waker.take() {
                    w.wake();
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        {
            let mut state = this.conn.state.lock().expect("conn");
            if state.closed {
                return Poll::Ready(Err(TunnelConn::closed_pipe()));
            }
            if state.paused && !state.bp_closed {
                state.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        match this.writer.poll_reserve(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "use of closed network connection",
            ))),
            Poll::Ready(Ok(())) => {
                let n = buf.len().min(MAX_DATA);
                let data = this.session.message(this.conn.id, kind::DATA, &buf[..n]);
                match this.writer.send_item(data) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(_) => Poll::Ready(Err(TunnelConn::closed_pipe())),
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// `connection.Close`: there is no half close in remotedialer.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close();
        Poll::Ready(Ok(()))
    }
}

impl TunnelConn {
    fn close(&self) {
        self.session.close_connection(self.conn.id, ConnError::Eof);
        let mut state = self.conn.state.lock().expect("conn");
        state.bp_closed = true;
        Conn::wake(&mut state);
    }
}

impl Drop for TunnelConn {
    fn drop(&mut self) {
        self.close();
    }
}

/// One frontend's tunnel server (each k3s server has its own): sessions per client key,
/// in the order they came, the first one dialed (session_manager.go).
pub struct TunnelServer {
    sessions: Mutex<BTreeMap<String, Vec<Arc<Session>>>>,
    log: Arc<TunnelLog>,
    ids: Arc<AtomicI64>,
}

impl TunnelServer {
    pub fn new(log: Arc<TunnelLog>) -> TunnelServer {
        // message.go starts its message IDs at a random number.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as i64 * 1_000_003)
            .unwrap_or(1);
        TunnelServer {
            sessions: Mutex::new(BTreeMap::new()),
            log,
            ids: Arc::new(AtomicI64::new(seed)),
        }
    }

    /// The session a dial for `node` uses.
    pub fn first(&self, node: &str) -> Option<Arc<Session>> {
        let sessions = self.sessions.lock().expect("sessions");
        sessions.get(node).and_then(|list| list.first().cloned())
    }

    pub fn count(&self, node: &str) -> usize {
        let sessions = self.sessions.lock().expect("sessions");
        sessions.get(node).map_or(0, Vec::len)
    }

    /// `getDialer` and a dial through its session.
    pub async fn dial(&self, node: &str, proto: &str, address: &str) -> Result<TunnelConn, String> {
        let Some(session) = self.first(node) else {
            return Err(format!("failed to find Session for client {node}"));
        };
        session.dial(proto, address).await
    }

    /// Sends one raw binary message on the node's first session.
    pub async fn send_raw(&self, node: &str, frame: Vec<u8>) -> Result<(), String> {
        let Some(session) = self.first(node) else {
            return Err(format!("failed to find Session for client {node}"));
        };
        session.send(frame, CONNECT_TIMEOUT).await
    }

    /// Ends every session abruptly: the TCP connection closes, no close frame is sent.
    pub fn drop_all(&self) {
        let sessions = self.sessions.lock().expect("sessions");
        for session in sessions.values().flatten() {
            session.kill.cancel();
        }
    }

    fn add(&self, session: Arc<Session>) -> bool {
        let mut sessions = self.sessions.lock().expect("sessions");
        let list = sessions.entry(session.client_key.clone()).or_default();
        if list.len() >= MAX_SESSIONS_PER_NODE {
            return false;
        }
        list.push(session);
        true
    }

    fn remove(&self, session: &Arc<Session>) {
        let mut sessions = self.sessions.lock().expect("sessions");
        if let Some(list) = sessions.get_mut(&session.client_key) {
            list.retain(|s| !Arc::ptr_eq(s, session));
            if list.is_empty() {
                sessions.remove(&session.client_key);
            }
        }
    }

    /// Serves one upgraded connection as a remotedialer server session for `node`
    /// until it ends (`Server.ServeHTTP` after the upgrade).
    pub async fn serve<S>(self: Arc<Self>, node: String, io: S, stop: CancellationToken)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        let kill = stop.child_token();
        let session = Arc::new(Session {
            client_key: node.clone(),
            // sessionManager.add: rand.Int63().
            session_key: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| (d.as_nanos() as i64).wrapping_mul(6_364_136_223_846_793_005) & i64::MAX)
                .unwrap_or(1),
            next_conn_id: AtomicI64::new(1),
            conns: Mutex::new(BTreeMap::new()),
            out: tx,
            ids: self.ids.clone(),
            kill: kill.clone(),
        });
        if !self.add(session.clone()) {
            return;
        }
        let writer_kill = kill.clone();
        let writer = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = writer_kill.cancelled() => return,
                    frame = rx.recv() => match frame {
                        // The end of a session that was not killed: what is queued is sent.
                        Some(frame) if frame.is_empty() => return,
                        Some(frame) => {
                            if sink.send(Message::Binary(frame.into())).await.is_err() {
                                writer_kill.cancel();
                                return;
                            }
                        }
                        None => return,
                    },
                }
            }
        });
        let mut deadline = tokio::time::Instant::now() + PING_WAIT;
        loop {
            let next = tokio::select! {
                _ = kill.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                next = stream.next() => next,
            };
            match next {
                Some(Ok(Message::Binary(frame))) => {
                    self.log.push(&node, logged(&frame));
                    if session.serve_message(&frame).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    // errWrongMessageType.
                    self.log.push(
                        &node,
                        TunnelMessage {
                            id: 0,
                            conn_id: 0,
                            kind: 0,
                            payload: text.as_bytes()[..text.len().min(LOGGED_PAYLOAD)].to_vec(),
                            payload_len: text.len(),
                            error: Some("text message".into()),
                        },
                    );
                    break;
                }
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => {
                    deadline = tokio::time::Instant::now() + PING_WAIT;
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(Message::Frame(_))) => {}
            }
        }
        self.remove(&session);
        // remotedialer does not close the WebSocket when Serve returns: the Errors of
        // Session.Close still reach the agent (unless the session was killed).
        session.close();
        session.send_soon(Vec::new());
        let _ = tokio::time::timeout(SEND_ERROR_TIMEOUT, writer).await;
        kill.cancel();
    }
}

/// A received frame as the log keeps it.
fn logged(frame: &[u8]) -> TunnelMessage {
    let keep = |bytes: &[u8]| bytes[..bytes.len().min(LOGGED_PAYLOAD)].to_vec();
    match decode(frame) {
        Ok(m) => TunnelMessage {
            id: m.id,
            conn_id: m.conn_id,
            kind: m.kind,
            payload: keep(m.body),
            payload_len: m.body.len(),
            error: None,
        },
        Err(e) => TunnelMessage {
            id: 0,
            conn_id: 0,
            kind: 0,
            payload: keep(frame),
            payload_len: frame.len(),
            error: Some(e),
        },
    }
}
