//! Byte-stream view of a WebSocket message stream, for `SPDY/3.1+portforward.k8s.io`:
//! kubectl 1.30+ sends SPDY frames inside binary WebSocket messages with no alignment
//! between frames and messages, so the SPDY session reads the concatenated payloads and
//! its writes go out as messages.
//!
//! Generic over `Stream<Item = Result<Vec<u8>, E>>` + `Sink<Vec<u8>>`, so a WebSocket
//! library's connection plugs in after mapping binary messages to `Vec<u8>` (and dropping
//! pings, which the library answers).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest message payload written; larger writes are split (the reader concatenates).
pub const DEFAULT_MAX_MESSAGE: usize = 32 << 10;

/// `AsyncRead + AsyncWrite` over binary messages: reads return message payloads in order
/// (EOF when the stream ends), each write sends one message.
#[derive(Debug)]
pub struct MessageIo<S> {
    inner: S,
    current: Bytes,
    max_message: usize,
    eof: bool,
}

impl<S> MessageIo<S> {
    /// Wraps a message stream and sink.
    pub fn new(inner: S) -> Self {
        Self::with_max_message(inner, DEFAULT_MAX_MESSAGE)
    }

    /// Wraps, splitting writes into messages of at most `max_message` bytes.
    pub fn with_max_message(inner: S, max_message: usize) -> Self {
        Self {
            inner,
            current: Bytes::new(),
            max_message: max_message.max(1),
            eof: false,
        }
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn other<E: Into<Box<dyn std::error::Error + Send + Sync>>>(e: E) -> io::Error {
    io::Error::other(e)
}

impl<S, E> AsyncRead for MessageIo<S>
where
    S: Stream<Item = Result<Vec<u8>, E>> + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Empty messages are skipped: returning nothing would read as EOF.
        while self.current.is_empty() && !self.eof {
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(message)) => self.current = Bytes::from(message),
                Some(Err(e)) => return Poll::Ready(Err(other(e))),
                None => self.eof = true,
            }
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current[..n]);
        self.current.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S> AsyncWrite for MessageIo<S>
where
    S: Sink<Vec<u8>> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(other)?;
        let n = buf.len().min(self.max_message);
        Pin::new(&mut self.inner)
            .start_send(buf[..n].to_vec())
            .map_err(other)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx).map_err(other)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::channel::mpsc;
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::kubelet::spdy::{self, Frame, FrameDecoder, FrameEncoder, Limits};

    /// Messages in from a channel, messages out to another: what a WebSocket looks like
    /// once binary payloads are mapped to `Vec<u8>`.
    struct Duplex {
        incoming: mpsc::Receiver<Result<Vec<u8>, Infallible>>,
        outgoing: mpsc::Sender<Vec<u8>>,
    }

    impl Stream for Duplex {
        type Item = Result<Vec<u8>, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_next_unpin(cx)
        }
    }

    impl Sink<Vec<u8>> for Duplex {
        type Error = mpsc::SendError;
        fn poll_ready(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            self.outgoing.poll_ready_unpin(cx)
        }
        fn start_send(mut self: Pin<&mut Self>, item: Vec<u8>) -> Result<(), Self::Error> {
            self.outgoing.start_send_unpin(item)
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            self.outgoing.poll_flush_unpin(cx)
        }
        fn poll_close(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            self.outgoing.poll_close_unpin(cx)
        }
    }

    /// The adapter, the sender of incoming messages, the receiver of outgoing ones.
    type Pair = (
        MessageIo<Duplex>,
        mpsc::Sender<Result<Vec<u8>, Infallible>>,
        mpsc::Receiver<Vec<u8>>,
    );

    fn pair() -> Pair {
        let (in_tx, in_rx) = mpsc::channel(4);
        let (out_tx, out_rx) = mpsc::channel(4);
        let io = MessageIo::with_max_message(
            Duplex {
                incoming: in_rx,
                outgoing: out_tx,
            },
            8,
        );
        (io, in_tx, out_rx)
    }

    #[tokio::test]
    async fn messages_read_as_one_byte_stream() {
        let (mut io, mut tx, _rx) = pair();
        for message in [&b"hel"[..], b"", b"lo ", b"world"] {
            tx.send(Ok(message.to_vec())).await.unwrap();
        }
        drop(tx);
        let mut got = String::new();
        io.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
    }

    #[tokio::test]
    async fn writes_become_bounded_messages() {
        let (mut io, _tx, mut rx) = pair();
        let writer = tokio::spawn(async move {
            io.write_all(b"0123456789abc").await.unwrap();
            io.shutdown().await.unwrap();
        });
        let mut messages = Vec::new();
        while let Some(message) = rx.next().await {
            messages.push(message);
        }
        writer.await.unwrap();
        assert_eq!(messages, [b"01234567".to_vec(), b"89abc".to_vec()]);
    }

    #[tokio::test]
    async fn stream_errors_surface_as_io_errors() {
        let (in_tx, in_rx) = mpsc::channel::<Result<Vec<u8>, io::Error>>(1);
        let mut in_tx = in_tx;
        in_tx.send(Err(io::Error::other("reset"))).await.unwrap();
        let mut io = MessageIo::new(in_rx);
        let mut buf = [0u8; 4];
        assert!(io.read(&mut buf).await.is_err());
    }

    /// SPDY through messages split at odd places: a SYN_STREAM cut across two messages
    /// and the SYN_REPLY coming back as messages.
    #[tokio::test]
    async fn a_spdy_session_runs_over_messages() {
        let (io, mut tx, mut rx) = pair();
        let (_session, mut streams) = spdy::accept(io);
        let mut wire = Vec::new();
        let mut encoder = FrameEncoder::new().unwrap();
        encoder
            .encode(
                &Frame::SynStream {
                    stream_id: 1,
                    associated_to: 0,
                    priority: 0,
                    fin: false,
                    unidirectional: false,
                    headers: [("streamtype", "data"), ("port", "80"), ("requestid", "0")]
                        .into_iter()
                        .collect(),
                },
                &mut wire,
            )
            .unwrap();
        let (a, b) = wire.split_at(5);
        tx.send(Ok(a.to_vec())).await.unwrap();
        tx.send(Ok(b.to_vec())).await.unwrap();
        let stream = streams.recv().await.unwrap();
        assert_eq!(stream.headers().get("port"), Some("80"));

        let mut decoder = FrameDecoder::new(Limits::default());
        let mut buf = bytes::BytesMut::new();
        let frame = loop {
            if let Some(frame) = decoder.decode(&mut buf).unwrap() {
                break frame;
            }
            buf.extend_from_slice(&rx.next().await.unwrap());
        };
        assert!(
            matches!(frame, Frame::SynReply { stream_id: 1, .. }),
            "{frame:?}"
        );
    }
}
