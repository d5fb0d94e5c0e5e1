//! rancher/remotedialer's messages, as pure encoding with no I/O: one message per binary
//! WebSocket message; a header of zigzag varints (Go's `binary.PutVarint`): message id,
//! connection id, type, and for Data and Connect one more, a deadline that receivers
//! ignore; then the payload. k3s 1.21's remotedialer knows only the types up to
//! RemoveClient and ignores the rest.

use std::net::IpAddr;

use bytes::Bytes;

/// What Go's `binary.PutVarint` writes at most for an i64.
const MAX_VARINT_LEN: usize = 10;
/// remotedialer reads at most this much of a Connect payload (`proto/address`).
pub const MAX_CONNECT_PAYLOAD: usize = 266;
/// The deadline field senders write (remotedialer's `legacyDeadline`, 15 s in ms).
const LEGACY_DEADLINE_MS: i64 = 15_000;
/// remotedialer reads at most this much of an Error payload.
const MAX_ERROR_TEXT: usize = 100;

pub const DATA: i64 = 1;
pub const CONNECT: i64 = 2;
pub const ERROR: i64 = 3;
pub const ADD_CLIENT: i64 = 4;
pub const REMOVE_CLIENT: i64 = 5;
pub const PAUSE: i64 = 6;
pub const RESUME: i64 = 7;
pub const SYNC_CONNECTIONS: i64 = 8;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated or overlong varint in the header")]
    Header,
    #[error("SyncConnections payload of {0} bytes is not a list of 8-byte ids")]
    SyncPayload(usize),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: i64,
    pub conn_id: i64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Bytes of one tunnelled connection (a view into the received message, no copy).
    Data(Bytes),
    /// Open a connection to `proto/address` (the raw payload; see [`connect_target`]).
    Connect(Vec<u8>),
    /// The connection is over; "EOF" is a clean end.
    Error(String),
    /// Peer bookkeeping between servers; nothing for a client to do.
    AddClient(Vec<u8>),
    RemoveClient(Vec<u8>),
    /// Stop sending Data on this connection until Resume.
    Pause,
    Resume,
    /// The sender's complete list of live connection ids.
    SyncConnections(Vec<i64>),
    /// A type this side does not know (ignored, as remotedialer does).
    Unknown(i64),
}

impl Body {
    fn kind(&self) -> i64 {
        match self {
            Body::Data(_) => DATA,
            Body::Connect(_) => CONNECT,
            Body::Error(_) => ERROR,
            Body::AddClient(_) => ADD_CLIENT,
            Body::RemoveClient(_) => REMOVE_CLIENT,
            Body::Pause => PAUSE,
            Body::Resume => RESUME,
            Body::SyncConnections(_) => SYNC_CONNECTIONS,
            Body::Unknown(kind) => *kind,
        }
    }

    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Body::Data(_) => "data",
            Body::Connect(_) => "connect",
            Body::Error(_) => "error",
            Body::AddClient(_) => "add_client",
            Body::RemoveClient(_) => "remove_client",
            Body::Pause => "pause",
            Body::Resume => "resume",
            Body::SyncConnections(_) => "sync_connections",
            Body::Unknown(_) => "unknown",
        }
    }
}

fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

/// Go's `binary.ReadVarint`: at most 10 bytes, the last one at most 1.
fn read_varint(bytes: &[u8]) -> Result<(i64, usize), FrameError> {
    let mut value: u64 = 0;
    for (i, byte) in bytes.iter().take(MAX_VARINT_LEN).enumerate() {
        if i == MAX_VARINT_LEN - 1 && *byte > 1 {
            return Err(FrameError::Header);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let signed = ((value >> 1) as i64) ^ -((value & 1) as i64);
            return Ok((signed, i + 1));
        }
    }
    Err(FrameError::Header)
}

/// A Data message for `payload`, built with one copy: what a tunnelled connection's
/// reads become.
pub fn encode_data(id: i64, conn_id: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 * MAX_VARINT_LEN + payload.len());
    put_varint(&mut out, id);
    put_varint(&mut out, conn_id);
    put_varint(&mut out, DATA);
    put_varint(&mut out, LEGACY_DEADLINE_MS);
    out.extend_from_slice(payload);
    out
}

pub fn encode(frame: &Frame) -> Vec<u8> {
    let payload: &[u8] = match &frame.body {
        Body::Data(bytes) => return encode_data(frame.id, frame.conn_id, bytes),
        Body::Connect(bytes) => bytes,
        Body::AddClient(bytes) | Body::RemoveClient(bytes) => bytes,
        Body::Error(text) => text.as_bytes(),
        Body::Pause | Body::Resume | Body::Unknown(_) => &[],
        Body::SyncConnections(_) => &[],
    };
    let ids: Vec<u8> = match &frame.body {
        Body::SyncConnections(ids) => ids.iter().flat_map(|id| id.to_le_bytes()).collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::with_capacity(4 * MAX_VARINT_LEN + payload.len() + ids.len());
    let kind = frame.body.kind();
    put_varint(&mut out, frame.id);
    put_varint(&mut out, frame.conn_id);
    put_varint(&mut out, kind);
    if kind == DATA || kind == CONNECT {
        put_varint(&mut out, LEGACY_DEADLINE_MS);
    }
    out.extend_from_slice(payload);
    out.extend_from_slice(&ids);
    out
}

pub fn decode(message: Bytes) -> Result<Frame, FrameError> {
    let bytes: &[u8] = &message;
    let mut at = 0;
    let mut next = |bytes: &[u8]| -> Result<i64, FrameError> {
        let (value, used) = read_varint(&bytes[at..])?;
        at += used;
        Ok(value)
    };
    let id = next(bytes)?;
    let conn_id = next(bytes)?;
    let kind = next(bytes)?;
    if kind == DATA || kind == CONNECT {
        next(bytes)?;
    }
    let payload = &bytes[at..];
    let body = match kind {
        DATA => Body::Data(message.slice(at..)),
        CONNECT => Body::Connect(payload.to_vec()),
        ERROR => {
            let text = &payload[..payload.len().min(MAX_ERROR_TEXT)];
            Body::Error(String::from_utf8_lossy(text).into_owned())
        }
        ADD_CLIENT => Body::AddClient(payload.to_vec()),
        REMOVE_CLIENT => Body::RemoveClient(payload.to_vec()),
        PAUSE => Body::Pause,
        RESUME => Body::Resume,
        SYNC_CONNECTIONS => {
            if !payload.len().is_multiple_of(8) {
                return Err(FrameError::SyncPayload(payload.len()));
            }
            Body::SyncConnections(
                payload
                    .chunks_exact(8)
                    .map(|chunk| {
                        let mut id = [0u8; 8];
                        id.copy_from_slice(chunk);
                        i64::from_le_bytes(id)
                    })
                    .collect(),
            )
        }
        other => Body::Unknown(other),
    };
    Ok(Frame { id, conn_id, body })
}

/// Why a Connect is refused: its answer is an Error for that connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("connect payload of {0} bytes is longer than {MAX_CONNECT_PAYLOAD}")]
    TooLong(usize),
    #[error("connect payload is not proto/host:port")]
    Malformed,
    #[error("connect not allowed: {0}")]
    NotAllowed(String),
}

/// The only place a session may connect to: this node's kubelet port on loopback, as
/// k3s asks (`tcp/127.0.0.1:<kubelet port>`, or `[::1]`). Returns the port.
pub fn connect_target(payload: &[u8], kubelet_port: u16) -> Result<u16, Refusal> {
    if payload.len() > MAX_CONNECT_PAYLOAD {
        return Err(Refusal::TooLong(payload.len()));
    }
    let text = std::str::from_utf8(payload).map_err(|_| Refusal::Malformed)?;
    let (proto, address) = text.split_once('/').ok_or(Refusal::Malformed)?;
    if proto != "tcp" {
        return Err(Refusal::NotAllowed(text.to_owned()));
    }
    let (host, port) = address.rsplit_once(':').ok_or(Refusal::Malformed)?;
    let port: u16 = port.parse().map_err(|_| Refusal::Malformed)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback || port != kubelet_port {
        return Err(Refusal::NotAllowed(text.to_owned()));
    }
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(conn_id: i64, body: Body) -> Frame {
        Frame {
            id: 7,
            conn_id,
            body,
        }
    }

    #[test]
    fn varints_are_go_zigzag() {
        // binary.PutVarint(buf, x) for these values, as Go writes them.
        let cases: [(i64, &[u8]); 6] = [
            (0, &[0x00]),
            (1, &[0x02]),
            (-1, &[0x01]),
            (63, &[0x7e]),
            (-65, &[0x81, 0x01]),
            (15_000, &[0xb0, 0xea, 0x01]),
        ];
        for (value, bytes) in cases {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, bytes, "{value}");
            assert_eq!(read_varint(bytes), Ok((value, bytes.len())));
        }
        for (value, len) in [(i64::MIN, 10), (i64::MAX, 10), (-(1 << 62), 9)] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), len);
            assert_eq!(read_varint(&out), Ok((value, len)));
        }
    }

    #[test]
    fn a_connect_as_remotedialer_writes_it() {
        // newConnect(2, "tcp", "127.0.0.1:10250") with id 7: id, connID, type, deadline.
        let bytes = encode(&frame(2, Body::Connect(b"tcp/127.0.0.1:10250".to_vec())));
        assert_eq!(&bytes[..6], &[0x0e, 0x04, 0x04, 0xb0, 0xea, 0x01]);
        assert_eq!(&bytes[6..], b"tcp/127.0.0.1:10250");
        assert_eq!(
            decode(bytes.clone().into()).map(|f| f.body),
            Ok(Body::Connect(b"tcp/127.0.0.1:10250".to_vec()))
        );
    }

    #[test]
    fn every_kind_round_trips() {
        for body in [
            Body::Data(Bytes::from_static(&[1, 2, 3])),
            Body::Data(Bytes::new()),
            Body::Connect(b"tcp/[::1]:10250".to_vec()),
            Body::Error("EOF".into()),
            Body::AddClient(b"peer/3".to_vec()),
            Body::RemoveClient(b"peer/3".to_vec()),
            Body::Pause,
            Body::Resume,
            Body::SyncConnections(vec![2, 3, 1 << 40, -5]),
            Body::Unknown(99),
        ] {
            let sent = frame(-12, body);
            assert_eq!(decode(encode(&sent).into()), Ok(sent));
        }
    }

    #[test]
    fn bad_headers_and_payloads_are_errors_not_panics() {
        assert_eq!(decode(Bytes::new()), Err(FrameError::Header));
        assert_eq!(decode(Bytes::from_static(&[0x80])), Err(FrameError::Header));
        assert_eq!(
            decode(Bytes::from_static(&[0x02, 0x02])),
            Err(FrameError::Header)
        );
        // A Data header without its deadline.
        assert_eq!(
            decode(Bytes::from_static(&[0x02, 0x02, 0x02])),
            Err(FrameError::Header)
        );
        assert_eq!(
            decode(Bytes::from_static(&[0xff; 11])),
            Err(FrameError::Header)
        );
        let mut sync = encode(&frame(0, Body::SyncConnections(vec![1])));
        sync.push(0);
        assert_eq!(decode(sync.into()), Err(FrameError::SyncPayload(9)));
        // An Error's text is read up to 100 bytes, as remotedialer reads it.
        let long = encode(&frame(1, Body::Error("x".repeat(500))));
        assert_eq!(
            decode(long.into()).map(|f| f.body),
            Ok(Body::Error("x".repeat(100)))
        );
    }

    #[test]
    fn only_the_kubelet_port_on_loopback_may_be_reached() {
        assert_eq!(connect_target(b"tcp/127.0.0.1:10250", 10250), Ok(10250));
        assert_eq!(connect_target(b"tcp/[::1]:10250", 10250), Ok(10250));
        assert_eq!(connect_target(b"tcp/localhost:10250", 10250), Ok(10250));
        for refused in [
            &b"tcp/127.0.0.1:22"[..],
            b"tcp/10.0.0.1:10250",
            b"udp/127.0.0.1:10250",
            b"unix//run/podman/podman.sock",
            b"tcp/example.com:10250",
        ] {
            assert!(
                matches!(connect_target(refused, 10250), Err(Refusal::NotAllowed(_))),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
        for malformed in [
            &b"tcp"[..],
            b"tcp/127.0.0.1",
            b"tcp/127.0.0.1:x",
            b"\xff/a:1",
        ] {
            assert_eq!(connect_target(malformed, 10250), Err(Refusal::Malformed));
        }
        let long = format!("tcp/{}:10250", "a".repeat(300));
        assert_eq!(
            connect_target(long.as_bytes(), 10250),
            Err(Refusal::TooLong(long.len()))
        );
    }
}
