//! A server-side SPDY/3.1 session over one upgraded connection.
//!
//! [`accept`] splits the connection between two halves of one task: a reader that decodes
//! frames and routes them, and a writer that owns the header compressor and writes queued
//! frames in order (SYN_REPLY before the stream's data, because header compression state
//! must follow wire order). Client-opened streams come out of a bounded channel as
//! [`SpdyStream`]s, each an `AsyncRead` (client to server) and `AsyncWrite` (server to
//! client).
//!
//! Memory is bounded everywhere a peer could push: frames are size-limited by the codec,
//! each stream buffers at most [`SessionConfig::stream_buffer`] bytes (plus one frame)
//! before the reader stops reading the connection, and the outgoing queue holds at most
//! [`SessionConfig::write_queue`] bytes before writers wait and the reader stops answering.
//! WINDOW_UPDATEs go out only as the application consumes data.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::frame::{
    Frame, FrameDecoder, FrameEncoder, FrameError, GoAwayStatus, Headers, Limits, RstStatus,
    INITIAL_WINDOW, MAX_31_BIT, SETTINGS_INITIAL_WINDOW_SIZE,
};

/// Tunables of one session; [`Default`] suits the kubelet's peers.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Frame and header-block size limits for incoming frames.
    pub limits: Limits,
    /// Bytes a stream buffers before the reader stops reading the connection. At least the
    /// 64 KiB window, so a peer that honours our window never hits it.
    pub stream_buffer: usize,
    /// Whether writes wait for the peer's stream and session windows. moby/spdystream (the
    /// API server's and kubectl's SPDY library) never sends WINDOW_UPDATE, so waiting would
    /// stall every stream after 64 KiB; the kubelet, also spdystream, never waits either and
    /// relies on TCP back-pressure. Off by default for that reason; turn it on for peers
    /// that implement SPDY/3.1 flow control.
    pub honor_peer_window: bool,
    /// Concurrently open streams; more are refused with RST_STREAM REFUSED_STREAM.
    pub max_streams: usize,
    /// Accepted streams waiting for the application before the reader stops.
    pub accept_backlog: usize,
    /// Bytes of encoded-to-be frames queued before writers wait.
    pub write_queue: usize,
    /// Largest DATA payload this side sends in one frame.
    pub max_data_frame: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            stream_buffer: INITIAL_WINDOW as usize,
            honor_peer_window: false,
            max_streams: 64,
            accept_backlog: 8,
            write_queue: 256 << 10,
            max_data_frame: 32 << 10,
        }
    }
}

/// Why a session ended badly.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// Reading or writing the connection failed.
    #[error("connection {kind:?}: {message}")]
    Io {
        kind: io::ErrorKind,
        message: String,
    },
    /// The peer sent something that is not SPDY/3.1 (a GOAWAY PROTOCOL_ERROR was queued).
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
}

impl From<io::Error> for SessionError {
    fn from(e: io::Error) -> Self {
        Self::Io {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// How a session ended: `Ok` when either side closed it cleanly.
pub type SessionEnd = Result<(), SessionError>;

/// Starts a session with [`SessionConfig::default`]; see [`accept_with`].
pub fn accept<T>(io: T) -> (Session, mpsc::Receiver<SpdyStream>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    accept_with(io, SessionConfig::default())
}

/// Starts serving SPDY/3.1 on an upgraded connection (the bytes after the 101). Every
/// stream the client opens gets a SYN_REPLY and is delivered on the returned channel; the
/// channel ends when the client sends GOAWAY or the session ends. Must be called inside a
/// tokio runtime.
pub fn accept_with<T>(io: T, config: SessionConfig) -> (Session, mpsc::Receiver<SpdyStream>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new()),
        writer_wake: Notify::new(),
        reader_wake: Notify::new(),
        ended: CancellationToken::new(),
        config,
    });
    let (streams_tx, streams_rx) = mpsc::channel(config.accept_backlog.max(1));
    let (done_tx, done_rx) = watch::channel(None);
    let task = Arc::clone(&shared);
    tokio::spawn(async move {
        let (rd, wr) = tokio::io::split(io);
        let reader = async {
            let result = read_loop(Arc::clone(&task), rd, streams_tx).await;
            task.finish(result);
        };
        let writer = async {
            let result = write_loop(&task, wr).await;
            task.finish(result);
            task.update(|st| {
                st.writer_done = true;
                st.wake_queue_waiters();
            });
        };
        tokio::join!(reader, writer);
        let end = task.lock().end.clone().unwrap_or(Ok(()));
        // Nobody may be waiting; that is fine.
        let _ = done_tx.send(Some(end));
    });
    (
        Session {
            shared,
            done: done_rx,
        },
        streams_rx,
    )
}

/// The handle of a running session. Dropping it does not end the session: the connection
/// runs until the peer closes it or [`Session::close`] is called.
#[derive(Debug)]
pub struct Session {
    shared: Arc<Shared>,
    done: watch::Receiver<Option<SessionEnd>>,
}

impl Session {
    /// Sends GOAWAY (last accepted stream, status OK), refuses new streams, flushes what is
    /// queued and closes the connection; open streams then read EOF and fail to write.
    pub fn close(&self) {
        self.shared.update(|st| {
            if st.end.is_none() && !st.closing {
                st.closing = true;
                st.accepting = false;
                let last_good_stream_id = st.last_peer_stream;
                st.push(Frame::GoAway {
                    last_good_stream_id,
                    status: GoAwayStatus::Ok,
                });
            }
        });
    }

    /// Waits until the connection is done with, and says why it ended.
    pub async fn closed(&self) -> SessionEnd {
        let mut done = self.done.clone();
        let end = done.wait_for(Option::is_some).await.map(|end| end.clone());
        match end {
            Ok(end) => end.unwrap_or(Ok(())),
            // The task is gone without a word: only if the runtime shut down.
            Err(_) => Err(SessionError::Io {
                kind: io::ErrorKind::Other,
                message: "session task stopped".into(),
            }),
        }
    }

    /// Bytes received but not yet read by the application, over all streams.
    pub fn buffered(&self) -> usize {
        self.shared
            .lock()
            .streams
            .values()
            .map(|s| s.recv_len)
            .sum()
    }
}

/// One client-opened stream: its SYN_STREAM headers, the client's data to read and a
/// writer back to the client.
#[derive(Debug)]
pub struct SpdyStream {
    headers: Headers,
    reader: StreamReader,
    writer: StreamWriter,
}

impl SpdyStream {
    /// The stream id the client chose (odd).
    pub fn id(&self) -> u32 {
        self.reader.id
    }

    /// The SYN_STREAM headers (`streamtype`, `port`, `requestid`, ...).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Separate halves, to read and write from different tasks.
    pub fn into_split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }
}

impl AsyncRead for SpdyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpdyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// Client-to-server data of one stream; EOF after the client's FIN or RST_STREAM, or when
/// the session ends. Dropping it discards (and acknowledges) whatever else arrives.
#[derive(Debug)]
pub struct StreamReader {
    id: u32,
    shared: Arc<Shared>,
}

/// Server-to-client data of one stream. `shutdown` sends FIN; dropping it without one
/// sends FIN too. Writes fail with `BrokenPipe` once the stream is reset or the session
/// is over.
#[derive(Debug)]
pub struct StreamWriter {
    id: u32,
    shared: Arc<Shared>,
}

impl StreamWriter {
    /// Aborts the stream in both directions with RST_STREAM.
    pub fn reset(&mut self, status: RstStatus) {
        let id = self.id;
        self.shared.update(|st| {
            if let Some(s) = st.streams.get_mut(&id) {
                if !s.reset && st.end.is_none() {
                    s.abort();
                    st.push(Frame::RstStream {
                        stream_id: id,
                        status,
                    });
                }
            }
        });
    }
}

impl AsyncRead for StreamReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let id = self.id;
        self.shared.update(|st| {
            let Some(s) = st.streams.get_mut(&id) else {
                return Poll::Ready(Ok(()));
            };
            let Some(chunk) = s.recv.front_mut() else {
                if s.remote_fin {
                    return Poll::Ready(Ok(()));
                }
                s.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            };
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            if chunk.is_empty() {
                s.recv.pop_front();
            }
            s.recv_len -= n;
            st.consumed(id, n);
            // The reader task may be waiting for this stream to have room.
            st.wake_reader = true;
            Poll::Ready(Ok(()))
        })
    }
}

impl AsyncWrite for StreamWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let (id, config) = (self.id, self.shared.config);
        self.shared.update(|st| {
            if st.end.is_some() || st.closing {
                return Poll::Ready(Err(broken_pipe("session closed")));
            }
            if st.queued_bytes >= config.write_queue {
                st.queue_waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            let session_window = st.session_send_window;
            let Some(s) = st.streams.get_mut(&id) else {
                return Poll::Ready(Err(broken_pipe("stream closed")));
            };
            if s.reset || s.local_fin {
                return Poll::Ready(Err(broken_pipe("stream closed")));
            }
            let mut n = buf.len().min(config.max_data_frame.max(1));
            if config.honor_peer_window {
                let window = s.send_window.min(session_window);
                if window <= 0 {
                    s.write_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                n = n.min(usize::try_from(window).unwrap_or(usize::MAX));
            }
            // Tracked even when not honoured, so switching it on mid-way stays consistent.
            let sent = i64::try_from(n).unwrap_or(i64::MAX);
            s.send_window -= sent;
            st.session_send_window -= sent;
            let seq = st.push(Frame::Data {
                stream_id: id,
                fin: false,
                data: Bytes::copy_from_slice(&buf[..n]),
            });
            if let Some(s) = st.streams.get_mut(&id) {
                s.last_seq = seq;
            }
            Poll::Ready(Ok(n))
        })
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        self.shared.update(|st| st.poll_written(id, cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.id;
        self.shared.update(|st| {
            st.send_fin(id);
            st.poll_written(id, cx)
        })
    }
}

impl Drop for StreamReader {
    fn drop(&mut self) {
        let id = self.id;
        self.shared.update(|st| {
            if let Some(s) = st.streams.get_mut(&id) {
                s.reader_gone = true;
                let unread = std::mem::take(&mut s.recv_len);
                s.recv.clear();
                st.consumed(id, unread);
                st.wake_reader = true;
                st.remove_if_unused(id);
            }
        });
    }
}

impl Drop for StreamWriter {
    fn drop(&mut self) {
        let id = self.id;
        self.shared.update(|st| {
            st.send_fin(id);
            if let Some(s) = st.streams.get_mut(&id) {
                s.writer_gone = true;
            }
            st.remove_if_unused(id);
        });
    }
}

fn broken_pipe(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, what.to_string())
}

/// What the two tasks and every stream handle share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Frames queued, or the session closing: the writer has work.
    writer_wake: Notify,
    /// A stream buffer or the outgoing queue has room: the reader may go on.
    reader_wake: Notify,
    /// Cancelled when the session ends, to stop a reader blocked on the connection.
    ended: CancellationToken,
    config: SessionConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves consistent-enough state to
        // shut down with; never turn it into a second panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state, then wakes the tasks it asked for, after unlocking.
    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let (result, wake_writer, wake_reader) = {
            let mut st = self.lock();
            let result = f(&mut st);
            let wakes = (st.wake_writer, st.wake_reader);
            st.wake_writer = false;
            st.wake_reader = false;
            (result, wakes.0, wakes.1)
        };
        if wake_writer {
            self.writer_wake.notify_one();
        }
        if wake_reader {
            self.reader_wake.notify_waiters();
        }
        result
    }

    /// Records the first way the session ended and ends every stream with it.
    fn finish(&self, result: SessionEnd) {
        self.update(|st| {
            if st.end.is_none() {
                st.end = Some(result);
            }
            st.accepting = false;
            for s in st.streams.values_mut() {
                s.remote_fin = true;
                s.local_fin = true;
                s.wake();
            }
            st.wake_queue_waiters();
            st.wake_writer = true;
            st.wake_reader = true;
        });
        self.ended.cancel();
    }

    /// Waits until `ready` holds, re-checking whenever the reader is woken; false if the
    /// session ended first.
    async fn wait_until(&self, mut ready: impl FnMut(&State) -> bool) -> bool {
        loop {
            let notified = self.reader_wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.ended.is_cancelled() {
                return false;
            }
            if ready(&self.lock()) {
                return true;
            }
            tokio::select! {
                () = notified => {}
                () = self.ended.cancelled() => return false,
            }
        }
    }
}

/// Everything mutable about a session, behind one lock that is never held across an await.
#[derive(Debug)]
struct State {
    streams: HashMap<u32, StreamState>,
    queue: VecDeque<Frame>,
    queued_bytes: usize,
    /// Sequence number of the last frame queued; frames are numbered from 1.
    queued_seq: u64,
    /// Frames written so far (so frame `n` is on the wire once `written_seq >= n`).
    written_seq: u64,
    /// Writers waiting for queue space or for their frames to be written.
    queue_waiters: Vec<Waker>,
    session_send_window: i64,
    initial_send_window: i64,
    session_unacked: u32,
    last_peer_stream: u32,
    accepting: bool,
    closing: bool,
    writer_done: bool,
    end: Option<SessionEnd>,
    wake_writer: bool,
    wake_reader: bool,
}

#[derive(Debug)]
struct StreamState {
    recv: VecDeque<Bytes>,
    recv_len: usize,
    recv_unacked: u32,
    remote_fin: bool,
    local_fin: bool,
    reset: bool,
    reader_gone: bool,
    writer_gone: bool,
    send_window: i64,
    /// Sequence number of this stream's last queued frame (0: none).
    last_seq: u64,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

impl StreamState {
    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    fn abort(&mut self) {
        self.reset = true;
        self.remote_fin = true;
        self.local_fin = true;
        self.wake();
    }
}

/// Window credit is returned once this much of a window has been consumed, to avoid a
/// WINDOW_UPDATE per read.
const WINDOW_UPDATE_THRESHOLD: u32 = INITIAL_WINDOW / 2;

impl State {
    fn new() -> Self {
        Self {
            streams: HashMap::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            queued_seq: 0,
            written_seq: 0,
            queue_waiters: Vec::new(),
            session_send_window: i64::from(INITIAL_WINDOW),
            initial_send_window: i64::from(INITIAL_WINDOW),
            session_unacked: 0,
            last_peer_stream: 0,
            accepting: true,
            closing: false,
            writer_done: false,
            end: None,
            wake_writer: false,
            wake_reader: false,
        }
    }

    /// Queues a frame for the writer and returns its sequence number.
    fn push(&mut self, frame: Frame) -> u64 {
        self.queued_bytes += queued_cost(&frame);
        self.queue.push_back(frame);
        self.queued_seq += 1;
        self.wake_writer = true;
        self.queued_seq
    }

    fn wake_queue_waiters(&mut self) {
        for w in self.queue_waiters.drain(..) {
            w.wake();
        }
    }

    /// The application consumed `n` bytes of stream `id`: return window credit in batches.
    fn consumed(&mut self, id: u32, n: usize) {
        let n = u32::try_from(n).unwrap_or(MAX_31_BIT);
        self.session_unacked = self.session_unacked.saturating_add(n);
        if self.session_unacked >= WINDOW_UPDATE_THRESHOLD {
            let delta = std::mem::take(&mut self.session_unacked).min(MAX_31_BIT);
            self.push(Frame::WindowUpdate {
                stream_id: 0,
                delta,
            });
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.recv_unacked = s.recv_unacked.saturating_add(n);
        // No credit for a stream the peer has finished: it will not send on it again.
        if s.recv_unacked >= WINDOW_UPDATE_THRESHOLD && !s.remote_fin {
            let delta = std::mem::take(&mut s.recv_unacked).min(MAX_31_BIT);
            self.push(Frame::WindowUpdate {
                stream_id: id,
                delta,
            });
        }
    }

    fn send_fin(&mut self, id: u32) {
        if self.end.is_some() {
            return;
        }
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.local_fin {
            return;
        }
        s.local_fin = true;
        let seq = self.push(Frame::Data {
            stream_id: id,
            fin: true,
            data: Bytes::new(),
        });
        if let Some(s) = self.streams.get_mut(&id) {
            s.last_seq = seq;
        }
    }

    /// Ready once every frame this stream queued is written (or can no longer be).
    fn poll_written(&mut self, id: u32, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let last = self.streams.get(&id).map_or(0, |s| s.last_seq);
        if self.written_seq >= last {
            return Poll::Ready(Ok(()));
        }
        if self.writer_done {
            return Poll::Ready(Err(broken_pipe("session closed before the data was sent")));
        }
        self.queue_waiters.push(cx.waker().clone());
        Poll::Pending
    }

    /// Forgets a stream both of whose handles are gone, resetting it if the peer is still
    /// sending (so it stops).
    fn remove_if_unused(&mut self, id: u32) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if !(s.reader_gone && s.writer_gone) {
            return;
        }
        let still_open = !s.remote_fin && !s.reset;
        self.streams.remove(&id);
        if still_open && self.end.is_none() {
            self.push(Frame::RstStream {
                stream_id: id,
                status: RstStatus::Cancel,
            });
        }
    }
}

/// Bytes a queued frame stands for, for the queue bound (header blocks are small).
fn queued_cost(frame: &Frame) -> usize {
    match frame {
        Frame::Data { data, .. } => 8 + data.len(),
        _ => 64,
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(shared: &Shared, mut io: W) -> SessionEnd {
    let mut encoder = FrameEncoder::new()?;
    let mut wire = Vec::new();
    loop {
        let batch: Option<Vec<Frame>> = {
            let mut st = shared.lock();
            if !st.queue.is_empty() {
                Some(st.queue.drain(..).collect())
            } else if st.closing || st.end.is_some() {
                break;
            } else {
                None
            }
        };
        let Some(batch) = batch else {
            // notify_one keeps a permit, so a push between unlock and here is not lost.
            shared.writer_wake.notified().await;
            continue;
        };
        wire.clear();
        let mut cost = 0;
        for frame in &batch {
            cost += queued_cost(frame);
            encoder.encode(frame, &mut wire)?;
        }
        io.write_all(&wire).await?;
        io.flush().await?;
        shared.update(|st| {
            st.queued_bytes = st.queued_bytes.saturating_sub(cost);
            st.written_seq += batch.len() as u64;
            st.wake_queue_waiters();
            st.wake_reader = true;
        });
    }
    // Best effort: the peer may already be gone, and the session is over either way.
    let _ = io.shutdown().await;
    Ok(())
}

async fn read_loop<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut io: R,
    streams: mpsc::Sender<SpdyStream>,
) -> SessionEnd {
    let mut decoder = FrameDecoder::new(shared.config.limits);
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut router = Router {
        shared: Arc::clone(&shared),
        streams: Some(streams),
    };
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if !router.route(frame).await {
                        return Ok(());
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    shared.update(|st| {
                        let last_good_stream_id = st.last_peer_stream;
                        st.push(Frame::GoAway {
                            last_good_stream_id,
                            status: GoAwayStatus::ProtocolError,
                        });
                    });
                    return Err(e.into());
                }
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 << 10);
        }
        let read = tokio::select! {
            read = io.read_buf(&mut buf) => read?,
            () = shared.ended.cancelled() => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
    }
}

/// Applies incoming frames to the session state.
struct Router {
    shared: Arc<Shared>,
    /// Dropped on GOAWAY or when the application stops accepting.
    streams: Option<mpsc::Sender<SpdyStream>>,
}

impl Router {
    /// Handles one frame; false once the session has ended.
    async fn route(&mut self, frame: Frame) -> bool {
        let config = self.shared.config;
        // Answers (PING, RST, WINDOW_UPDATE) queue frames: stop reading while the queue is
        // full, so a peer that sends but never reads cannot grow it.
        if !self
            .shared
            .wait_until(|st| st.queued_bytes < config.write_queue)
            .await
        {
            return false;
        }
        match frame {
            Frame::SynStream {
                stream_id,
                fin,
                unidirectional,
                headers,
                ..
            } => self.open(stream_id, fin, unidirectional, headers).await,
            Frame::Data {
                stream_id,
                fin,
                data,
            } => self.data(stream_id, fin, data).await,
            Frame::RstStream { stream_id, .. } => {
                self.shared.update(|st| {
                    if let Some(s) = st.streams.get_mut(&stream_id) {
                        s.abort();
                    }
                    st.wake_reader = true;
                });
                true
            }
            Frame::Settings { entries, .. } => {
                self.shared.update(|st| {
                    for e in entries {
                        if e.id == SETTINGS_INITIAL_WINDOW_SIZE && e.value <= MAX_31_BIT {
                            let delta = i64::from(e.value) - st.initial_send_window;
                            st.initial_send_window = i64::from(e.value);
                            for s in st.streams.values_mut() {
                                s.send_window += delta;
                                s.wake();
                            }
                        }
                    }
                });
                true
            }
            Frame::Ping { id } => {
                // Odd ids are the client's; even ones would answer our pings, which we
                // never send.
                if id % 2 == 1 {
                    self.shared.update(|st| st.push(Frame::Ping { id }));
                }
                true
            }
            Frame::GoAway { .. } => {
                // The client opens no more streams; open ones may still finish.
                self.streams = None;
                self.shared.update(|st| st.accepting = false);
                true
            }
            Frame::Headers { stream_id, fin, .. } => {
                if fin {
                    self.shared.update(|st| {
                        if let Some(s) = st.streams.get_mut(&stream_id) {
                            s.remote_fin = true;
                            s.wake();
                        }
                    });
                }
                true
            }
            Frame::WindowUpdate { stream_id, delta } => {
                self.window_update(stream_id, delta);
                true
            }
            // We open no streams, so a SYN_REPLY answers nothing; unknown frames are
            // ignored as the spec says.
            Frame::SynReply { .. } | Frame::Unknown { .. } => true,
        }
    }

    async fn open(&mut self, id: u32, fin: bool, unidirectional: bool, headers: Headers) -> bool {
        let config = self.shared.config;
        let refusal = self.shared.update(|st| {
            // Client streams are odd and increasing (SPDY/3 section 2.3.2).
            if id.is_multiple_of(2) || id <= st.last_peer_stream {
                return Some(RstStatus::ProtocolError);
            }
            st.last_peer_stream = id;
            if !st.accepting {
                return Some(RstStatus::RefusedStream);
            }
            (st.streams.len() >= config.max_streams).then_some(RstStatus::RefusedStream)
        });
        let permit = match (refusal, self.streams.clone()) {
            (None, Some(tx)) => tokio::select! {
                permit = tx.reserve_owned() => permit.ok(),
                () = self.shared.ended.cancelled() => return false,
            },
            _ => None,
        };
        let Some(permit) = permit else {
            if refusal.is_none() {
                // The application dropped the receiver: it takes no more streams.
                self.streams = None;
            }
            self.shared.update(|st| {
                st.push(Frame::RstStream {
                    stream_id: id,
                    status: refusal.unwrap_or(RstStatus::RefusedStream),
                });
            });
            return true;
        };
        self.shared.update(|st| {
            let send_window = st.initial_send_window;
            st.streams.insert(
                id,
                StreamState {
                    recv: VecDeque::new(),
                    recv_len: 0,
                    recv_unacked: 0,
                    remote_fin: fin,
                    // The client may not receive on a unidirectional stream.
                    local_fin: unidirectional,
                    reset: false,
                    reader_gone: false,
                    writer_gone: false,
                    send_window,
                    last_seq: 0,
                    read_waker: None,
                    write_waker: None,
                },
            );
            if !unidirectional {
                // What spdystream's SendReply sends: no headers, stream stays open.
                st.push(Frame::SynReply {
                    stream_id: id,
                    fin: false,
                    headers: Headers::new(),
                });
            }
        });
        let shared = Arc::clone(&self.shared);
        permit.send(SpdyStream {
            headers,
            reader: StreamReader {
                id,
                shared: Arc::clone(&shared),
            },
            writer: StreamWriter { id, shared },
        });
        true
    }

    async fn data(&mut self, id: u32, fin: bool, data: Bytes) -> bool {
        let limit = self.shared.config.stream_buffer.max(1);
        let len = data.len();
        // Back-pressure: a frame waits until its stream has room (an empty buffer always
        // takes one frame, so one frame larger than the limit still gets through).
        let room = self.shared.wait_until(|st| match st.streams.get(&id) {
            Some(s) => {
                s.reader_gone || s.remote_fin || s.recv_len == 0 || s.recv_len + len <= limit
            }
            None => true,
        });
        if !room.await {
            return false;
        }
        self.shared.update(|st| {
            let known = id % 2 == 1 && id <= st.last_peer_stream;
            let Some(s) = st.streams.get_mut(&id) else {
                // Late data on a stream we forgot is harmless; data on one never opened is
                // an error. Either way the session window gets its credit back.
                if !known {
                    st.push(Frame::RstStream {
                        stream_id: id,
                        status: RstStatus::InvalidStream,
                    });
                }
                st.consumed(id, len);
                return;
            };
            if s.remote_fin {
                if !s.reset {
                    st.push(Frame::RstStream {
                        stream_id: id,
                        status: RstStatus::StreamAlreadyClosed,
                    });
                }
                st.consumed(id, len);
                return;
            }
            if s.reader_gone {
                s.remote_fin |= fin;
                st.consumed(id, len);
                return;
            }
            if len > 0 {
                s.recv.push_back(data);
                s.recv_len += len;
            }
            s.remote_fin |= fin;
            if let Some(w) = s.read_waker.take() {
                w.wake();
            }
        });
        true
    }

    fn window_update(&self, id: u32, delta: u32) {
        self.shared.update(|st| {
            if id == 0 {
                st.session_send_window =
                    (st.session_send_window + i64::from(delta)).min(i64::from(MAX_31_BIT));
                for s in st.streams.values_mut() {
                    if let Some(w) = s.write_waker.take() {
                        w.wake();
                    }
                }
                return;
            }
            let Some(s) = st.streams.get_mut(&id) else {
                return;
            };
            s.send_window += i64::from(delta);
            if s.send_window > i64::from(MAX_31_BIT) {
                // SPDY/3 section 2.6.8: a window past 2^31-1 is a flow-control error.
                s.abort();
                st.push(Frame::RstStream {
                    stream_id: id,
                    status: RstStatus::FlowControlError,
                });
                return;
            }
            if let Some(w) = s.write_waker.take() {
                w.wake();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::timeout;

    use super::*;

    /// A SPDY client written with the same codec, driven by hand.
    struct Client {
        io: DuplexStream,
        encoder: FrameEncoder,
        decoder: FrameDecoder,
        buf: BytesMut,
    }

    impl Client {
        fn new(io: DuplexStream) -> Self {
            Self {
                io,
                encoder: FrameEncoder::new().unwrap(),
                decoder: FrameDecoder::new(Limits::default()),
                buf: BytesMut::new(),
            }
        }

        async fn send(&mut self, frame: Frame) {
            let mut wire = Vec::new();
            self.encoder.encode(&frame, &mut wire).unwrap();
            self.io.write_all(&wire).await.unwrap();
        }

        async fn open(&mut self, id: u32, headers: &[(&str, &str)]) {
            self.send(Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                fin: false,
                unidirectional: false,
                headers: headers.iter().copied().collect(),
            })
            .await;
        }

        /// The next frame, or None at EOF; fails the test after 5 s of silence.
        async fn recv(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) = self.decoder.decode(&mut self.buf).unwrap() {
                    return Some(frame);
                }
                let read = timeout(Duration::from_secs(5), self.io.read_buf(&mut self.buf))
                    .await
                    .expect("server went quiet")
                    .unwrap();
                if read == 0 {
                    return None;
                }
            }
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    fn data(stream_id: u32, fin: bool, bytes: &[u8]) -> Frame {
        Frame::Data {
            stream_id,
            fin,
            data: Bytes::copy_from_slice(bytes),
        }
    }

    async fn next_stream(rx: &mut mpsc::Receiver<SpdyStream>) -> SpdyStream {
        timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no stream")
            .expect("channel closed")
    }

    /// Exec-shaped: error, stdin and stdout streams; the server echoes stdin to stdout.
    /// Both sides honour 64 KiB windows and move 200 KB each way, so both directions need
    /// WINDOW_UPDATEs to finish.
    #[tokio::test]
    async fn streams_carry_data_both_ways_under_flow_control() {
        let (server_io, client_io) = tokio::io::duplex(64 << 10);
        let config = SessionConfig {
            honor_peer_window: true,
            ..SessionConfig::default()
        };
        let (session, mut rx) = accept_with(server_io, config);
        let server = tokio::spawn(async move {
            let mut by_type = HashMap::new();
            for _ in 0..3 {
                let stream = next_stream(&mut rx).await;
                let kind = stream.headers().get("streamtype").unwrap().to_string();
                by_type.insert(kind, stream);
            }
            let mut stdin = by_type.remove("stdin").unwrap();
            let mut stdout = by_type.remove("stdout").unwrap();
            let mut error = by_type.remove("error").unwrap();
            let copied = tokio::io::copy(&mut stdin, &mut stdout).await.unwrap();
            stdout.shutdown().await.unwrap();
            error.write_all(b"{\"status\":\"Success\"}").await.unwrap();
            error.shutdown().await.unwrap();
            // The client's GOAWAY ends the stream channel.
            assert!(rx.recv().await.is_none());
            copied
        });

        let mut client = Client::new(client_io);
        client.send(Frame::Ping { id: 1 }).await;
        client.open(1, &[("streamtype", "error")]).await;
        client.open(3, &[("streamtype", "stdin")]).await;
        client.open(5, &[("streamtype", "stdout")]).await;

        let input = pattern(200_000, 0);
        let (mut sent, mut fin_sent) = (0usize, false);
        let (mut stdin_window, mut session_window) = (65_536i64, 65_536i64);
        let mut recv_window: HashMap<u32, i64> = HashMap::new();
        let mut unacked = 0u32;
        let (mut stdout, mut error) = (Vec::new(), Vec::new());
        let mut fins = HashMap::new();
        let mut replied = Vec::new();
        let mut pong = false;
        while fins.len() < 2 {
            while sent < input.len() && stdin_window.min(session_window) > 0 {
                let n = (input.len() - sent)
                    .min(16 << 10)
                    .min(stdin_window.min(session_window) as usize);
                client.send(data(3, false, &input[sent..sent + n])).await;
                sent += n;
                stdin_window -= n as i64;
                session_window -= n as i64;
            }
            if sent == input.len() && !fin_sent {
                client.send(data(3, true, b"")).await;
                fin_sent = true;
            }
            match client.recv().await.expect("server closed early") {
                Frame::SynReply { stream_id, fin, .. } => {
                    assert!(!fin);
                    replied.push(stream_id);
                }
                Frame::Ping { id } => pong = id == 1,
                Frame::WindowUpdate { stream_id, delta } => match stream_id {
                    0 => session_window += i64::from(delta),
                    3 => stdin_window += i64::from(delta),
                    other => panic!("window update for {other}"),
                },
                Frame::Data {
                    stream_id,
                    fin,
                    data,
                } => {
                    assert!(replied.contains(&stream_id), "data before SYN_REPLY");
                    let window = recv_window.entry(stream_id).or_insert(65_536);
                    *window -= data.len() as i64;
                    assert!(*window >= 0, "server overran the window of {stream_id}");
                    match stream_id {
                        5 => stdout.extend_from_slice(&data),
                        1 => error.extend_from_slice(&data),
                        other => panic!("data on {other}"),
                    }
                    unacked += data.len() as u32;
                    if unacked >= 16 << 10 {
                        for id in [0, stream_id] {
                            client
                                .send(Frame::WindowUpdate {
                                    stream_id: id,
                                    delta: unacked,
                                })
                                .await;
                        }
                        *recv_window.get_mut(&stream_id).unwrap() += i64::from(unacked);
                        unacked = 0;
                    }
                    if fin {
                        fins.insert(stream_id, true);
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(pong, "PING answered");
        assert_eq!(replied, [1, 3, 5], "one SYN_REPLY per stream, in order");
        assert_eq!(stdout, input, "stdout echoes stdin in order");
        assert_eq!(error, b"{\"status\":\"Success\"}");

        client
            .send(Frame::GoAway {
                last_good_stream_id: 0,
                status: GoAwayStatus::Ok,
            })
            .await;
        assert_eq!(server.await.unwrap(), input.len() as u64);
        drop(client);
        assert_eq!(session.closed().await, Ok(()));
    }

    /// spdystream never sends WINDOW_UPDATE and ignores ours: with the default config
    /// more than a window still flows both ways.
    #[tokio::test]
    async fn a_peer_without_flow_control_is_not_stalled() {
        let (server_io, client_io) = tokio::io::duplex(16 << 10);
        let (_session, mut rx) = accept(server_io);
        let server = tokio::spawn(async move {
            let stream = next_stream(&mut rx).await;
            assert_eq!(stream.headers().get("port"), Some("8080"));
            let (mut reader, mut writer) = stream.into_split();
            let write = tokio::spawn(async move {
                writer.write_all(&pattern(300_000, 7)).await.unwrap();
                writer.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            write.await.unwrap();
            got
        });

        let mut client = Client::new(client_io);
        client
            .open(
                1,
                &[("streamtype", "data"), ("port", "8080"), ("requestid", "0")],
            )
            .await;
        // Write and read concurrently, as the peer's sender ignores windows.
        let (rd, mut wr) = tokio::io::split(client.io);
        let writer = tokio::spawn(async move {
            let mut encoder = FrameEncoder::new().unwrap();
            let input = pattern(300_000, 3);
            for (i, chunk) in input.chunks(32 << 10).enumerate() {
                let last = (i + 1) * (32 << 10) >= input.len();
                let mut wire = Vec::new();
                encoder.encode(&data(1, last, chunk), &mut wire).unwrap();
                wr.write_all(&wire).await.unwrap();
            }
            wr
        });
        let mut decoder = client.decoder;
        let mut buf = client.buf;
        let mut rd = rd;
        let mut got = Vec::new();
        'outer: loop {
            while let Some(frame) = decoder.decode(&mut buf).unwrap() {
                if let Frame::Data { data, fin, .. } = frame {
                    got.extend_from_slice(&data);
                    if fin {
                        break 'outer;
                    }
                }
            }
            let read = timeout(Duration::from_secs(5), rd.read_buf(&mut buf))
                .await
                .expect("stalled")
                .unwrap();
            assert!(read > 0, "server closed early");
        }
        assert_eq!(got, pattern(300_000, 7));
        assert_eq!(server.await.unwrap(), pattern(300_000, 3));
        drop(writer.await.unwrap());
    }

    /// A stream nobody reads: the session buffers a bounded amount and then stops reading
    /// the connection, so the flooding client blocks instead of memory growing.
    #[tokio::test]
    async fn a_slow_reader_pushes_back_instead_of_buffering() {
        let (server_io, client_io) = tokio::io::duplex(16 << 10);
        let (session, mut rx) = accept(server_io);
        let mut client = Client::new(client_io);
        client.open(1, &[("streamtype", "stdin")]).await;
        let stream = next_stream(&mut rx).await;
        let input = pattern(1 << 20, 9);
        let flood = {
            let input = input.clone();
            tokio::spawn(async move {
                for chunk in input.chunks(32 << 10) {
                    client.send(data(1, false, chunk)).await;
                }
                client.send(data(1, true, b"")).await;
                client
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !flood.is_finished(),
            "the client could send 1 MiB into a stalled stream"
        );
        let buffered = session.buffered();
        assert!(buffered <= (64 << 10) + (32 << 10), "buffered {buffered}");

        let (mut reader, _writer) = stream.into_split();
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, input);
        // The server credited what was read, up to the client's FIN (a finished stream gets
        // no more credit); the client, never reading, finds the updates queued.
        let mut client = flood.await.unwrap();
        let mut credited = 0u64;
        while credited < (1 << 20) - (128 << 10) {
            if let Some(Frame::WindowUpdate {
                stream_id: 1,
                delta,
            }) = client.recv().await
            {
                credited += u64::from(delta);
            }
        }
    }

    #[tokio::test]
    async fn a_malformed_frame_ends_the_session_with_goaway() {
        let (server_io, client_io) = tokio::io::duplex(16 << 10);
        let (session, mut rx) = accept(server_io);
        let mut client = Client::new(client_io);
        client.open(1, &[("streamtype", "stdout")]).await;
        let mut stream = next_stream(&mut rx).await;
        // A PING of SPDY version 2.
        client
            .io
            .write_all(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1])
            .await
            .unwrap();
        assert!(matches!(
            client.recv().await,
            Some(Frame::SynReply { stream_id: 1, .. })
        ));
        assert_eq!(
            client.recv().await,
            Some(Frame::GoAway {
                last_good_stream_id: 1,
                status: GoAwayStatus::ProtocolError
            })
        );
        assert_eq!(client.recv().await, None, "connection closed");
        assert_eq!(
            session.closed().await,
            Err(SessionError::Protocol(FrameError::UnsupportedVersion(2)))
        );
        let mut buf = Vec::new();
        assert_eq!(stream.read_to_end(&mut buf).await.unwrap(), 0);
        assert!(stream.write_all(b"late").await.is_err());
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn reset_and_disconnect_end_streams() {
        let (server_io, client_io) = tokio::io::duplex(16 << 10);
        let (session, mut rx) = accept(server_io);
        let mut client = Client::new(client_io);
        client.open(1, &[("streamtype", "stdin")]).await;
        client.open(3, &[("streamtype", "stdout")]).await;
        client.send(data(1, false, b"partial")).await;
        client
            .send(Frame::RstStream {
                stream_id: 1,
                status: RstStatus::Cancel,
            })
            .await;
        let mut first = next_stream(&mut rx).await;
        let mut second = next_stream(&mut rx).await;
        let mut got = Vec::new();
        first.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"partial", "data before the RST, then EOF");
        assert_eq!(
            first.write_all(b"x").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );

        drop(client);
        got.clear();
        second.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        assert!(second.write_all(b"x").await.is_err());
        assert_eq!(session.closed().await, Ok(()));
    }

    #[tokio::test]
    async fn close_sends_goaway_and_ends_streams() {
        let (server_io, client_io) = tokio::io::duplex(16 << 10);
        let (session, mut rx) = accept(server_io);
        let mut client = Client::new(client_io);
        client.open(1, &[("streamtype", "error")]).await;
        let mut stream = next_stream(&mut rx).await;
        stream.write_all(b"bye").await.unwrap();
        session.close();
        assert!(matches!(
            client.recv().await,
            Some(Frame::SynReply { stream_id: 1, .. })
        ));
        assert_eq!(client.recv().await, Some(data(1, false, b"bye")));
        assert_eq!(
            client.recv().await,
            Some(Frame::GoAway {
                last_good_stream_id: 1,
                status: GoAwayStatus::Ok
            })
        );
        assert_eq!(client.recv().await, None);
        assert_eq!(session.closed().await, Ok(()));
        assert!(stream.write_all(b"more").await.is_err());
    }

    #[tokio::test]
    async fn bad_and_excess_streams_are_refused() {
        let (server_io, client_io) = tokio::io::duplex(16 << 10);
        let config = SessionConfig {
            max_streams: 1,
            ..SessionConfig::default()
        };
        let (_session, mut rx) = accept_with(server_io, config);
        let mut client = Client::new(client_io);
        client.open(2, &[]).await; // even: a server-side id
        client.open(3, &[]).await;
        client.open(1, &[]).await; // not increasing
        client.open(5, &[]).await; // over max_streams
        client.send(data(9, false, b"?")).await; // never opened
        let _kept = next_stream(&mut rx).await;
        let mut seen = Vec::new();
        while seen.len() < 5 {
            match client.recv().await.unwrap() {
                Frame::RstStream { stream_id, status } => seen.push((stream_id, status)),
                Frame::SynReply { stream_id, .. } => seen.push((stream_id, RstStatus::Other(0))),
                Frame::WindowUpdate { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            seen,
            [
                (2, RstStatus::ProtocolError),
                (3, RstStatus::Other(0)),
                (1, RstStatus::ProtocolError),
                (5, RstStatus::RefusedStream),
                (9, RstStatus::InvalidStream),
            ]
        );
    }
}
