//! Kubelet requests relayed between node and agent over libp2p streams: a length-
//! prefixed header each way (see [`crate::wire::KubeletRequest`]), then raw bytes.
//! The stream's own flow control (Yamux) gives back-pressure end to end.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use libp2p::PeerId;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::mesh::{read_declared, MeshHandle};
use crate::wire::{
    self, KubeletAnswer, KubeletRequest, KUBELET_PROTOCOL, MAX_KUBELET_HEADER_BYTES,
};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("stream failed")]
    Io(#[from] std::io::Error),
    #[error("header of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("bad frame: {0}")]
    BadFrame(String),
}

/// Writes one header: a big-endian u32 length, then the message.
pub async fn write_header<T: Serialize>(
    io: &mut (impl AsyncWrite + Unpin),
    message: &T,
) -> Result<(), RelayError> {
    write_message(io, message, MAX_KUBELET_HEADER_BYTES).await
}

/// Reads one header written by [`write_header`].
pub async fn read_header<T: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin),
) -> Result<T, RelayError> {
    read_message(io, MAX_KUBELET_HEADER_BYTES).await
}

/// Writes one message of at most `limit` bytes: a big-endian u32 length, then the
/// message.
pub async fn write_message<T: Serialize>(
    io: &mut (impl AsyncWrite + Unpin),
    message: &T,
    limit: usize,
) -> Result<(), RelayError> {
    let bytes = wire::encode(message, limit)?;
    let len = u32::try_from(bytes.len()).map_err(|_| RelayError::TooLarge(bytes.len()))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one message written by [`write_message`]; a length over `limit` is refused
/// before anything is allocated.
pub async fn read_message<T: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin),
    limit: usize,
) -> Result<T, RelayError> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(RelayError::TooLarge(len));
    }
    let bytes = read_declared(&mut (&mut *io).compat(), len).await?;
    Ok(wire::decode(&bytes, limit)?)
}

/// Buffer of each direction when bytes are relayed between a TCP connection and a
/// kubelet stream: one write can fill a Noise frame (64 KiB) instead of eight
/// (tokio's default buffer is 8 KiB); see BENCHMARKS.md for what it gains.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides are done, with [`RELAY_BUFFER`]s.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER).await
}

/// The serving end's answer header for `connected`: its refusal, whose message is the
/// Err, or Ok, which hands the connected end back.
pub async fn answer<S, T>(io: &mut S, connected: Result<T, KubeletAnswer>) -> Result<T, String>
where
    S: AsyncWrite + Unpin,
{
    match connected {
        Ok(connected) => {
            write_header(io, &KubeletAnswer::Ok)
                .await
                .map_err(|e| e.to_string())?;
            Ok(connected)
        }
        Err(refusal) => {
            let _ = write_header(io, &refusal).await;
            Err(match refusal {
                KubeletAnswer::Failed { message, .. } => message,
                KubeletAnswer::Ok => String::new(),
            })
        }
    }
}

/// The serving end of a stream that carries one TCP connection: the [`answer`] for
/// `connected`, then the bytes both ways until both sides are done.
pub async fn answer_and_splice<S>(
    io: &mut S,
    connected: Result<tokio::net::TcpStream, KubeletAnswer>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tcp = answer(io, connected).await?;
    let _ = tcp.set_nodelay(true);
    splice(&mut tcp, io)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The largest UDP payload (over IPv4).
pub const MAX_DATAGRAM: usize = 65_507;

/// Writes one message after its big-endian u16 length: datagrams on a stream, and DNS
/// over TCP (RFC 1035, 4.2.2), are framed so.
pub async fn write_u16_framed(
    io: &mut (impl AsyncWrite + Unpin),
    message: &[u8],
) -> Result<(), RelayError> {
    let len = u16::try_from(message.len()).map_err(|_| RelayError::TooLarge(message.len()))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(message).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one message written by [`write_u16_framed`] into `buffer`, refused when longer
/// than `limit`; None when the stream ended between messages.
pub async fn read_u16_framed(
    io: &mut (impl AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
    limit: usize,
) -> Result<Option<usize>, RelayError> {
    let mut len = [0u8; 2];
    match io.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = usize::from(u16::from_be_bytes(len));
    if len > limit {
        return Err(RelayError::TooLarge(len));
    }
    buffer.resize(len, 0);
    io.read_exact(buffer).await?;
    Ok(Some(len))
}

/// Writes one datagram on a stream ([`write_u16_framed`]).
pub async fn write_datagram(
    io: &mut (impl AsyncWrite + Unpin),
    datagram: &[u8],
) -> Result<(), RelayError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(RelayError::TooLarge(datagram.len()));
    }
    write_u16_framed(io, datagram).await
}

/// Reads one datagram written by [`write_datagram`] into `buffer`; None when the
/// stream ended between datagrams.
pub async fn read_datagram(
    io: &mut (impl AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
) -> Result<Option<usize>, RelayError> {
    read_u16_framed(io, buffer, MAX_DATAGRAM).await
}

/// Relays datagrams between a stream (framed) and a connected UDP socket until the
/// stream ends.
pub async fn relay_datagrams(
    io: impl AsyncRead + AsyncWrite + Unpin,
    socket: &tokio::net::UdpSocket,
) -> Result<(), RelayError> {
    let (mut reader, mut writer) = tokio::io::split(io);
    let (mut outbound, mut inbound) = (Vec::new(), vec![0u8; MAX_DATAGRAM]);
    loop {
        tokio::select! {
            read = read_datagram(&mut reader, &mut outbound) => match read? {
                Some(_) => {
                    // A datagram the pod's port refuses (ICMP) is lost, as UDP is.
                    let _ = socket.send(&outbound).await;
                }
                None => return Ok(()),
            },
            received = socket.recv(&mut inbound) => match received {
                Ok(len) => write_datagram(&mut writer, &inbound[..len]).await?,
                // ICMP port unreachable from an earlier datagram: nothing listens yet.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
}

/// Attempts at opening a kubelet stream, 100 ms, 200 ms, 400 ms apart.
const OPEN_ATTEMPTS: u32 = 4;

/// Opens a kubelet stream to `agent` and sends `request`: the stream, ready for the
/// requested bytes, or the refusal as an HTTP status and the kubelet's text.
///
/// libp2p-stream drops an inbound stream when the agent's accept loop has not yet taken
/// the previous one, so under load a stream may close before any answer: then the agent
/// never saw the request, and it is sent again on a new stream.
pub async fn request_agent(
    mesh: &MeshHandle,
    agent: PeerId,
    request: &KubeletRequest,
) -> Result<Compat<libp2p::Stream>, (u16, String)> {
    request_stream(mesh, agent, KUBELET_PROTOCOL, request).await
}

/// As [`request_agent`], for any stream protocol whose header is `request` and whose
/// answer is a [`KubeletAnswer`] (e.g. an agent relaying a pod's cluster connection to
/// its owner).
pub async fn request_stream<R: Serialize>(
    mesh: &MeshHandle,
    agent: PeerId,
    protocol: &'static str,
    request: &R,
) -> Result<Compat<libp2p::Stream>, (u16, String)> {
    let mut attempt = 0;
    loop {
        match try_request(mesh, agent, protocol, request).await {
            Err(Attempt::Dropped(e)) if attempt + 1 < OPEN_ATTEMPTS => {
                tracing::debug!(%agent, %protocol, error = %e, attempt, "stream dropped; opening another");
                tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
                attempt += 1;
            }
            Err(Attempt::Dropped(e) | Attempt::Failed(e)) => {
                return Err((502, format!("cannot reach agent {agent}: {e}")))
            }
            Err(Attempt::Refused(code, message)) => return Err((code, message)),
            Ok(io) => return Ok(io),
        }
    }
}

enum Attempt {
    /// Closed before any answer: the agent did not take the stream.
    Dropped(String),
    Failed(String),
    Refused(u16, String),
}

async fn try_request<R: Serialize>(
    mesh: &MeshHandle,
    agent: PeerId,
    protocol: &'static str,
    request: &R,
) -> Result<Compat<libp2p::Stream>, Attempt> {
    let stream = mesh
        .open_stream(agent, libp2p::StreamProtocol::new(protocol))
        .await
        .map_err(|e| Attempt::Dropped(e.to_string()))?;
    let mut io = stream.compat();
    write_header(&mut io, request)
        .await
        .map_err(|e| Attempt::Dropped(e.to_string()))?;
    match read_header(&mut io).await {
        Ok(KubeletAnswer::Ok) => Ok(io),
        Ok(KubeletAnswer::Failed { code, message }) => Err(Attempt::Refused(code, message)),
        Err(RelayError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(Attempt::Dropped(e.to_string()))
        }
        Err(e) => Err(Attempt::Failed(e.to_string())),
    }
}

/// Largest payload of one session frame.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// How an interactive session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Exit {
    Code(i32),
    Error(String),
}

/// The frames of an interactive session (exec) after the headers: a tag byte, a
/// big-endian u32 length, the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Node to agent.
    Stdin(Vec<u8>),
    StdinClosed,
    Resize {
        width: u16,
        height: u16,
    },
    /// Agent to node.
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(Exit),
}

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const EXIT: u8 = 3;
const RESIZE: u8 = 4;
const STDIN_CLOSED: u8 = 5;

pub async fn write_frame(
    io: &mut (impl AsyncWrite + Unpin),
    frame: &Frame,
) -> Result<(), RelayError> {
    let (tag, payload): (u8, std::borrow::Cow<[u8]>) = match frame {
        Frame::Stdin(bytes) => (STDIN, bytes.into()),
        Frame::StdinClosed => (STDIN_CLOSED, (&[][..]).into()),
        Frame::Resize { width, height } => {
            let mut bytes = width.to_be_bytes().to_vec();
            bytes.extend_from_slice(&height.to_be_bytes());
            (RESIZE, bytes.into())
        }
        Frame::Stdout(bytes) => (STDOUT, bytes.into()),
        Frame::Stderr(bytes) => (STDERR, bytes.into()),
        Frame::Exit(exit) => (
            EXIT,
            serde_json::to_vec(exit)
                .map_err(std::io::Error::other)?
                .into(),
        ),
    };
    if payload.len() > MAX_FRAME_BYTES {
        return Err(RelayError::TooLarge(payload.len()));
    }
    let len = payload.len() as u32;
    io.write_all(&[tag]).await?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&payload).await?;
    io.flush().await?;
    Ok(())
}

/// The next frame; None when the peer closed the stream between frames.
pub async fn read_frame(io: &mut (impl AsyncRead + Unpin)) -> Result<Option<Frame>, RelayError> {
    read_frame_within(io, None).await
}

/// The next frame, if its first byte comes within `wait` (`Ok(None)` otherwise, with
/// nothing consumed, so the stream can still be read); no limit without one. A frame
/// once begun is read whole.
pub async fn read_frame_within(
    io: &mut (impl AsyncRead + Unpin),
    wait: Option<std::time::Duration>,
) -> Result<Option<Frame>, RelayError> {
    let mut tag = [0u8; 1];
    let first = io.read(&mut tag);
    let read = match wait {
        Some(wait) => match tokio::time::timeout(wait, first).await {
            Ok(read) => read?,
            Err(_) => return Ok(None),
        },
        None => first.await?,
    };
    if read == 0 {
        return Ok(None);
    }
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(RelayError::TooLarge(len));
    }
    let payload = read_declared(&mut (&mut *io).compat(), len).await?;
    let bad = |what: &str| RelayError::BadFrame(what.to_owned());
    Ok(Some(match tag[0] {
        STDIN => Frame::Stdin(payload),
        STDIN_CLOSED => Frame::StdinClosed,
        STDOUT => Frame::Stdout(payload),
        STDERR => Frame::Stderr(payload),
        RESIZE => match payload.as_slice() {
            [w1, w2, h1, h2] => Frame::Resize {
                width: u16::from_be_bytes([*w1, *w2]),
                height: u16::from_be_bytes([*h1, *h2]),
            },
            _ => return Err(bad("resize frame of the wrong size")),
        },
        EXIT => Frame::Exit(serde_json::from_slice(&payload).map_err(|_| bad("exit frame"))?),
        other => return Err(bad(&format!("unknown frame tag {other}"))),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{KubeletAnswer, KubeletRequest, PodUid};

    #[tokio::test]
    async fn datagrams_keep_their_bounds_and_a_stream_ends_between_them() {
        let (mut a, mut b) = tokio::io::duplex(256 * 1024);
        write_datagram(&mut a, b"one").await.expect("write");
        write_datagram(&mut a, b"").await.expect("write");
        write_datagram(&mut a, &vec![7; MAX_DATAGRAM])
            .await
            .expect("write");
        assert!(matches!(
            write_datagram(&mut a, &vec![0; MAX_DATAGRAM + 1]).await,
            Err(RelayError::TooLarge(_))
        ));
        drop(a);
        let mut buffer = Vec::new();
        assert_eq!(
            read_datagram(&mut b, &mut buffer).await.expect("read"),
            Some(3)
        );
        assert_eq!(buffer, b"one");
        assert_eq!(
            read_datagram(&mut b, &mut buffer).await.expect("read"),
            Some(0)
        );
        let len = read_datagram(&mut b, &mut buffer).await.expect("read");
        assert_eq!(len, Some(MAX_DATAGRAM));
        assert_eq!(read_datagram(&mut b, &mut buffer).await.expect("end"), None);
        // A length over the limit from the other side is refused before it is read.
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u16::MAX.to_be_bytes()).await.expect("write");
        assert!(matches!(
            read_datagram(&mut b, &mut buffer).await,
            Err(RelayError::TooLarge(65535))
        ));
    }

    #[tokio::test]
    async fn headers_round_trip_and_oversized_ones_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let request = KubeletRequest::Logs {
            pod: PodUid("u".into()),
            container: "c".into(),
            follow: true,
            tail_lines: Some(5),
            timestamps: false,
            since: None,
            previous: false,
        };
        write_header(&mut a, &request).await.expect("writes");
        let back: KubeletRequest = read_header(&mut b).await.expect("reads");
        assert_eq!(back, request);

        a.write_all(&u32::MAX.to_be_bytes()).await.expect("writes");
        let refused = read_header::<KubeletAnswer>(&mut b).await;
        assert!(matches!(refused, Err(RelayError::TooLarge(_))));
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let frames = [
            Frame::Stdin(b"ls\n".to_vec()),
            Frame::StdinClosed,
            Frame::Resize {
                width: 120,
                height: 40,
            },
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(vec![]),
            Frame::Exit(Exit::Code(3)),
            Frame::Exit(Exit::Error("container not running".into())),
        ];
        for frame in &frames {
            write_frame(&mut a, frame).await.expect("writes");
        }
        for frame in &frames {
            assert_eq!(
                read_frame(&mut b).await.expect("reads").as_ref(),
                Some(frame)
            );
        }
        a.write_all(&[9, 0, 0, 0, 0]).await.expect("writes");
        assert!(matches!(
            read_frame(&mut b).await,
            Err(RelayError::BadFrame(_))
        ));
        drop(a);
        assert!(matches!(read_frame(&mut b).await, Ok(None)));
    }
}
