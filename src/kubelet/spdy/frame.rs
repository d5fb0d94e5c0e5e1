//! SPDY/3.1 frames: encode and decode every frame type, with no I/O.
//!
//! Wire layout (SPDY/3 draft, section 2.2): a control frame starts with the control bit,
//! a 15-bit version (3) and a 16-bit type; a data frame with a 31-bit stream id. Both then
//! carry 8 bits of flags and a 24-bit payload length. Header blocks (SYN_STREAM, SYN_REPLY,
//! HEADERS) are zlib-compressed through [`HeaderDeflater`]/[`HeaderInflater`], whose state
//! spans frames: the encoder and decoder here own them, so frames must be encoded in the
//! order they are written and decoded in the order they are read.

use bytes::{Buf, Bytes, BytesMut};

use super::zlib::{HeaderDeflater, HeaderInflater};

/// The only version this codec speaks (SPDY/3.1 still puts 3 on the wire).
pub const VERSION: u16 = 3;
/// Every stream's and the session's initial flow-control window (SPDY/3.1, 64 KiB).
pub const INITIAL_WINDOW: u32 = 65_536;
/// The largest window or stream id: both are 31-bit fields.
pub const MAX_31_BIT: u32 = 0x7fff_ffff;
/// Bytes in every frame's fixed header.
pub const FRAME_HEADER_LEN: usize = 8;
/// The largest payload the 24-bit length field can carry.
pub const MAX_PAYLOAD_LEN: usize = 0x00ff_ffff;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

/// FIN on DATA, SYN_STREAM, SYN_REPLY and HEADERS: the sender's half of the stream is done.
pub const FLAG_FIN: u8 = 0x01;
/// SYN_STREAM only: the receiver may not send on this stream.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// SETTINGS only: forget persisted settings.
pub const FLAG_CLEAR_SETTINGS: u8 = 0x01;

/// A malformed frame or header block; the session treats any of these as fatal.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length field exceeds what this side accepts.
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge { len: usize, limit: usize },
    /// A control frame of another SPDY version.
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    /// A payload whose size does not fit its frame type.
    #[error("{kind} frame with a payload of {len} bytes")]
    BadLength { kind: &'static str, len: usize },
    /// Stream id 0 where a stream is required, or a value outside 31 bits.
    #[error("invalid stream id {0}")]
    InvalidStreamId(u32),
    /// A field that the spec forbids (zero ping id, zero status, ...).
    #[error("invalid {0}")]
    InvalidField(&'static str),
    /// A header block that does not parse.
    #[error("malformed header block: {0}")]
    BadHeaderBlock(&'static str),
    /// A decompressed header block larger than allowed.
    #[error("header block larger than {limit} bytes")]
    HeaderBlockTooLarge { limit: usize },
    /// zlib failed (corrupt data, or state broken by an earlier error).
    #[error("header compression: {0}")]
    Compression(String),
    /// The zlib stream asks for a dictionary other than SPDY's.
    #[error("header block needs unknown zlib dictionary {0:#010x}")]
    UnknownDictionary(u32),
}

/// RST_STREAM status codes (SPDY/3 section 2.6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RstStatus {
    ProtocolError,
    InvalidStream,
    RefusedStream,
    UnsupportedVersion,
    Cancel,
    InternalError,
    FlowControlError,
    StreamInUse,
    StreamAlreadyClosed,
    InvalidCredentials,
    FrameTooLarge,
    /// A code this codec does not name, kept so it can be logged.
    Other(u32),
}

impl RstStatus {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            Self::ProtocolError => 1,
            Self::InvalidStream => 2,
            Self::RefusedStream => 3,
            Self::UnsupportedVersion => 4,
            Self::Cancel => 5,
            Self::InternalError => 6,
            Self::FlowControlError => 7,
            Self::StreamInUse => 8,
            Self::StreamAlreadyClosed => 9,
            Self::InvalidCredentials => 10,
            Self::FrameTooLarge => 11,
            Self::Other(code) => code,
        }
    }

    /// The status for a wire value.
    pub fn from_code(code: u32) -> Self {
        match code {
            1 => Self::ProtocolError,
            2 => Self::InvalidStream,
            3 => Self::RefusedStream,
            4 => Self::UnsupportedVersion,
            5 => Self::Cancel,
            6 => Self::InternalError,
            7 => Self::FlowControlError,
            8 => Self::StreamInUse,
            9 => Self::StreamAlreadyClosed,
            10 => Self::InvalidCredentials,
            11 => Self::FrameTooLarge,
            other => Self::Other(other),
        }
    }
}

/// GOAWAY status codes (SPDY/3 section 2.6.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoAwayStatus {
    Ok,
    ProtocolError,
    InternalError,
    Other(u32),
}

impl GoAwayStatus {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            Self::Ok => 0,
            Self::ProtocolError => 1,
            Self::InternalError => 2,
            Self::Other(code) => code,
        }
    }

    /// The status for a wire value.
    pub fn from_code(code: u32) -> Self {
        match code {
            0 => Self::Ok,
            1 => Self::ProtocolError,
            2 => Self::InternalError,
            other => Self::Other(other),
        }
    }
}

/// SETTINGS id for the initial window of new streams (the only one this side acts on).
pub const SETTINGS_INITIAL_WINDOW_SIZE: u32 = 7;

/// One SETTINGS entry: flags (persist/persisted), a 24-bit id, a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

/// A stream's name/value header block. Names are lowercase, as SPDY requires; a value that
/// holds several values separates them with NUL bytes, as on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// An empty block (what the kubelet sends in every SYN_REPLY).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a header; the name is lowercased.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0
            .push((name.into().to_ascii_lowercase(), value.into()));
    }

    /// The first value of the first header named `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.split('\0').next())
    }

    /// Every (name, raw value) pair, in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How many pairs the block holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the block holds no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Self::new();
        for (n, v) in iter {
            headers.push(n, v);
        }
        headers
    }
}

/// One SPDY/3.1 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: RstStatus,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: GoAwayStatus,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        /// 0 for the session window (SPDY/3.1), else a stream.
        stream_id: u32,
        delta: u32,
    },
    /// A control frame type this codec does not know; the spec says to ignore it.
    Unknown {
        kind: u16,
        flags: u8,
        payload: Bytes,
    },
}

/// Sizes the decoder accepts; everything beyond is an error rather than an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload (the wire allows 16 MiB; Go peers send at most 32 KiB of data
    /// per frame, as io.Copy does).
    pub max_payload: usize,
    /// Largest decompressed header block.
    pub max_header_block: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_payload: 1 << 20,
            max_header_block: 256 << 10,
        }
    }
}

/// Decodes frames from a byte buffer that fills up as bytes arrive.
#[derive(Debug)]
pub struct FrameDecoder {
    inflater: HeaderInflater,
    limits: Limits,
}

impl FrameDecoder {
    /// A decoder with its own header decompression stream.
    pub fn new(limits: Limits) -> Self {
        Self {
            inflater: HeaderInflater::new(),
            limits,
        }
    }

    /// Takes one whole frame off the front of `buf`, or returns `None` (consuming nothing)
    /// when `buf` does not hold one yet. A too-large length is rejected as soon as the
    /// 8-byte header is in, before any payload is buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = usize::from(buf[5]) << 16 | usize::from(buf[6]) << 8 | usize::from(buf[7]);
        if len > self.limits.max_payload {
            return Err(FrameError::FrameTooLarge {
                len,
                limit: self.limits.max_payload,
            });
        }
        if buf.len() < FRAME_HEADER_LEN + len {
            buf.reserve(FRAME_HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        let mut head = buf.split_to(FRAME_HEADER_LEN);
        let payload = buf.split_to(len).freeze();
        let first = head.get_u32();
        let flags = head.get_u8();
        if first & 0x8000_0000 == 0 {
            let stream_id = first & MAX_31_BIT;
            if stream_id == 0 {
                return Err(FrameError::InvalidStreamId(0));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                fin: flags & FLAG_FIN != 0,
                data: payload,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        self.control((first & 0xffff) as u16, flags, payload)
            .map(Some)
    }

    fn control(&mut self, kind: u16, flags: u8, mut p: Bytes) -> Result<Frame, FrameError> {
        let len = p.len();
        let fin = flags & FLAG_FIN != 0;
        match kind {
            TYPE_SYN_STREAM => {
                at_least("SYN_STREAM", len, 10)?;
                let stream_id = stream_id(p.get_u32())?;
                let associated_to = p.get_u32() & MAX_31_BIT;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                let headers = self.headers(&p)?;
                Ok(Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                })
            }
            TYPE_SYN_REPLY | TYPE_HEADERS => {
                let name = if kind == TYPE_HEADERS {
                    "HEADERS"
                } else {
                    "SYN_REPLY"
                };
                at_least(name, len, 4)?;
                let stream_id = stream_id(p.get_u32())?;
                let headers = self.headers(&p)?;
                Ok(if kind == TYPE_HEADERS {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                })
            }
            TYPE_RST_STREAM => {
                exactly("RST_STREAM", len, 8)?;
                let stream_id = stream_id(p.get_u32())?;
                let code = p.get_u32();
                if code == 0 {
                    return Err(FrameError::InvalidField("RST_STREAM status 0"));
                }
                Ok(Frame::RstStream {
                    stream_id,
                    status: RstStatus::from_code(code),
                })
            }
            TYPE_SETTINGS => {
                at_least("SETTINGS", len, 4)?;
                let count = p.get_u32() as usize;
                // Checked against the payload before allocating anything for `count`.
                if count.checked_mul(8) != Some(len - 4) {
                    return Err(FrameError::BadLength {
                        kind: "SETTINGS",
                        len,
                    });
                }
                let entries = (0..count)
                    .map(|_| {
                        let word = p.get_u32();
                        Setting {
                            flags: (word >> 24) as u8,
                            id: word & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Ok(Frame::Settings {
                    clear: flags & FLAG_CLEAR_SETTINGS != 0,
                    entries,
                })
            }
            TYPE_PING => {
                exactly("PING", len, 4)?;
                Ok(Frame::Ping { id: p.get_u32() })
            }
            TYPE_GOAWAY => {
                exactly("GOAWAY", len, 8)?;
                let last_good_stream_id = p.get_u32() & MAX_31_BIT;
                Ok(Frame::GoAway {
                    last_good_stream_id,
                    status: GoAwayStatus::from_code(p.get_u32()),
                })
            }
            TYPE_WINDOW_UPDATE => {
                exactly("WINDOW_UPDATE", len, 8)?;
                let stream_id = p.get_u32() & MAX_31_BIT;
                Ok(Frame::WindowUpdate {
                    stream_id,
                    delta: p.get_u32() & MAX_31_BIT,
                })
            }
            kind => Ok(Frame::Unknown {
                kind,
                flags,
                payload: p,
            }),
        }
    }

    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, FrameError> {
        let block = self
            .inflater
            .decompress(compressed, self.limits.max_header_block)?;
        decode_header_block(&block)
    }
}

/// Encodes frames, compressing header blocks through one stream.
#[derive(Debug)]
pub struct FrameEncoder {
    deflater: HeaderDeflater,
}

impl FrameEncoder {
    /// An encoder with its own header compression stream.
    pub fn new() -> Result<Self, FrameError> {
        Ok(Self {
            deflater: HeaderDeflater::new()?,
        })
    }

    /// Appends the wire form of `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), FrameError> {
        match frame {
            Frame::Data {
                stream_id,
                fin,
                data,
            } => {
                let id = stream_id_out(*stream_id)?;
                put_head(out, id, flag(*fin, FLAG_FIN), data.len())?;
                out.extend_from_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                fin,
                unidirectional,
                headers,
            } => {
                let block = self.deflater.compress(&encode_header_block(headers)?)?;
                let flags = flag(*fin, FLAG_FIN) | flag(*unidirectional, FLAG_UNIDIRECTIONAL);
                put_control(out, TYPE_SYN_STREAM, flags, 10 + block.len())?;
                out.extend_from_slice(&stream_id_out(*stream_id)?.to_be_bytes());
                out.extend_from_slice(&(associated_to & MAX_31_BIT).to_be_bytes());
                out.push((priority & 0x07) << 5);
                out.push(0); // credential slot: unused since SPDY/3.1
                out.extend_from_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
            | Frame::Headers {
                stream_id,
                fin,
                headers,
            } => {
                let kind = if matches!(frame, Frame::Headers { .. }) {
                    TYPE_HEADERS
                } else {
                    TYPE_SYN_REPLY
                };
                let block = self.deflater.compress(&encode_header_block(headers)?)?;
                put_control(out, kind, flag(*fin, FLAG_FIN), 4 + block.len())?;
                out.extend_from_slice(&stream_id_out(*stream_id)?.to_be_bytes());
                out.extend_from_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                put_control(out, TYPE_RST_STREAM, 0, 8)?;
                out.extend_from_slice(&stream_id_out(*stream_id)?.to_be_bytes());
                out.extend_from_slice(&status.code().to_be_bytes());
            }
            Frame::Settings { clear, entries } => {
                let count = u32::try_from(entries.len())
                    .map_err(|_| FrameError::InvalidField("SETTINGS count"))?;
                put_control(
                    out,
                    TYPE_SETTINGS,
                    flag(*clear, FLAG_CLEAR_SETTINGS),
                    4 + 8 * entries.len(),
                )?;
                out.extend_from_slice(&count.to_be_bytes());
                for s in entries {
                    let word = u32::from(s.flags) << 24 | (s.id & 0x00ff_ffff);
                    out.extend_from_slice(&word.to_be_bytes());
                    out.extend_from_slice(&s.value.to_be_bytes());
                }
            }
            Frame::Ping { id } => {
                put_control(out, TYPE_PING, 0, 4)?;
                out.extend_from_slice(&id.to_be_bytes());
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                put_control(out, TYPE_GOAWAY, 0, 8)?;
                out.extend_from_slice(&(last_good_stream_id & MAX_31_BIT).to_be_bytes());
                out.extend_from_slice(&status.code().to_be_bytes());
            }
            Frame::WindowUpdate { stream_id, delta } => {
                if *stream_id > MAX_31_BIT || *delta > MAX_31_BIT {
                    return Err(FrameError::InvalidField("WINDOW_UPDATE field over 31 bits"));
                }
                put_control(out, TYPE_WINDOW_UPDATE, 0, 8)?;
                out.extend_from_slice(&stream_id.to_be_bytes());
                out.extend_from_slice(&delta.to_be_bytes());
            }
            Frame::Unknown {
                kind,
                flags,
                payload,
            } => {
                put_control(out, *kind, *flags, payload.len())?;
                out.extend_from_slice(payload);
            }
        }
        Ok(())
    }
}

/// The uncompressed header block: a 32-bit count, then length-prefixed names and values.
pub fn encode_header_block(headers: &Headers) -> Result<Vec<u8>, FrameError> {
    let too_long = |_| FrameError::BadHeaderBlock("field longer than 4 GiB");
    let mut out = Vec::new();
    out.extend_from_slice(
        &u32::try_from(headers.len())
            .map_err(too_long)?
            .to_be_bytes(),
    );
    for (name, value) in headers.iter() {
        for field in [name, value] {
            out.extend_from_slice(&u32::try_from(field.len()).map_err(too_long)?.to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
    }
    Ok(out)
}

/// Parses an uncompressed header block; every length is checked against what is left.
pub fn decode_header_block(mut block: &[u8]) -> Result<Headers, FrameError> {
    let count = take_u32(&mut block)? as usize;
    // Each pair needs at least 8 bytes of lengths: a count beyond that is a lie.
    if count > block.len() / 8 {
        return Err(FrameError::BadHeaderBlock("more pairs than bytes"));
    }
    let mut headers = Headers(Vec::with_capacity(count));
    for _ in 0..count {
        let name = take_string(&mut block)?;
        if name.is_empty() {
            return Err(FrameError::BadHeaderBlock("empty header name"));
        }
        let value = take_string(&mut block)?;
        headers.push(name, value);
    }
    if !block.is_empty() {
        return Err(FrameError::BadHeaderBlock("trailing bytes"));
    }
    Ok(headers)
}

fn take_u32(block: &mut &[u8]) -> Result<u32, FrameError> {
    if block.len() < 4 {
        return Err(FrameError::BadHeaderBlock("truncated length"));
    }
    Ok(block.get_u32())
}

fn take_string(block: &mut &[u8]) -> Result<String, FrameError> {
    let len = take_u32(block)? as usize;
    if len > block.len() {
        return Err(FrameError::BadHeaderBlock("length past the end"));
    }
    let (field, rest) = block.split_at(len);
    *block = rest;
    String::from_utf8(field.to_vec()).map_err(|_| FrameError::BadHeaderBlock("not UTF-8"))
}

fn at_least(kind: &'static str, len: usize, min: usize) -> Result<(), FrameError> {
    if len < min {
        return Err(FrameError::BadLength { kind, len });
    }
    Ok(())
}

fn exactly(kind: &'static str, len: usize, want: usize) -> Result<(), FrameError> {
    if len != want {
        return Err(FrameError::BadLength { kind, len });
    }
    Ok(())
}

fn stream_id(word: u32) -> Result<u32, FrameError> {
    match word & MAX_31_BIT {
        0 => Err(FrameError::InvalidStreamId(0)),
        id => Ok(id),
    }
}

fn stream_id_out(id: u32) -> Result<u32, FrameError> {
    if id == 0 || id > MAX_31_BIT {
        return Err(FrameError::InvalidStreamId(id));
    }
    Ok(id)
}

fn flag(set: bool, bit: u8) -> u8 {
    if set {
        bit
    } else {
        0
    }
}

fn put_head(out: &mut Vec<u8>, first: u32, flags: u8, len: usize) -> Result<(), FrameError> {
    if len > MAX_PAYLOAD_LEN {
        return Err(FrameError::FrameTooLarge {
            len,
            limit: MAX_PAYLOAD_LEN,
        });
    }
    out.extend_from_slice(&first.to_be_bytes());
    out.push(flags);
    // Checked above: fits in 24 bits.
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    Ok(())
}

fn put_control(out: &mut Vec<u8>, kind: u16, flags: u8, len: usize) -> Result<(), FrameError> {
    let first = 0x8000_0000 | u32::from(VERSION) << 16 | u32::from(kind);
    put_head(out, first, flags, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `03-spdy-client-frames.bin` (identical to 05 and 06) from
    /// shared/fixtures/k3s-1.21-kubelet-requests: what k3s v1.21.2 sent right after the 101
    /// for `kubectl exec` (v1.32.4), copied here so the crate's tests stay self-contained.
    const RECORDED_EXEC: &[u8] = &[
        0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x29, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x62, 0x60, 0x60, 0x60, 0x04, 0xa7,
        0xb3, 0x92, 0xa2, 0xd4, 0xc4, 0x5c, 0x68, 0x51, 0xc2, 0x9a, 0x0a, 0x0a, 0x68, 0x00, 0x00,
        0x00, 0x00, 0xff, 0xff,
    ];

    /// `08-spdy-client-frames.bin`: the same for `kubectl port-forward` (80), cut off two
    /// bytes into the next frame.
    const RECORDED_PORT_FORWARD: &[u8] = &[
        0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3d, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x70, 0x3a, 0x2b,
        0x29, 0x4a, 0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80, 0x86, 0x14, 0xcb, 0x45,
        0xa0, 0x24, 0xcc, 0x64, 0x61, 0xc0, 0xc0, 0xc0, 0xc0, 0x59, 0x04, 0x89, 0xc4, 0x4c, 0x50,
        0xe2, 0x66, 0x34, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x80, 0x03,
    ];

    fn decode_all(bytes: &[u8]) -> (Vec<Frame>, BytesMut) {
        let mut decoder = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
        (frames, buf)
    }

    #[test]
    fn recorded_exec_frames_open_the_error_stream() {
        let (frames, rest) = decode_all(RECORDED_EXEC);
        assert!(rest.is_empty());
        let [Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            fin: false,
            unidirectional: false,
            headers,
        }] = frames.as_slice()
        else {
            panic!("{frames:?}")
        };
        assert_eq!(
            headers.iter().collect::<Vec<_>>(),
            [("streamtype", "error")]
        );
    }

    #[test]
    fn recorded_port_forward_frames_name_port_and_request() {
        let (frames, rest) = decode_all(RECORDED_PORT_FORWARD);
        // The next frame's first two bytes wait for more input.
        assert_eq!(&rest[..], [0x80, 0x03]);
        let [Frame::SynStream {
            stream_id: 1,
            headers,
            fin: false,
            ..
        }] = frames.as_slice()
        else {
            panic!("{frames:?}")
        };
        assert_eq!(headers.get("streamType"), Some("error"));
        assert_eq!(headers.get("port"), Some("80"));
        assert_eq!(headers.get("requestID"), Some("0"));
        assert_eq!(headers.len(), 3);
    }

    #[test]
    fn partial_input_consumes_nothing() {
        let mut decoder = FrameDecoder::new(Limits::default());
        for cut in 0..RECORDED_EXEC.len() {
            let mut buf = BytesMut::from(&RECORDED_EXEC[..cut]);
            assert_eq!(decoder.decode(&mut buf).unwrap(), None);
            assert_eq!(buf.len(), cut);
        }
    }

    fn every_frame_type() -> Vec<Frame> {
        let headers: Headers = [("streamtype", "stdout"), ("port", "8080")]
            .into_iter()
            .collect();
        vec![
            Frame::SynStream {
                stream_id: 3,
                associated_to: 1,
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
            Frame::Data {
                stream_id: MAX_31_BIT,
                fin: false,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 3,
                status: RstStatus::Cancel,
            },
            Frame::RstStream {
                stream_id: 3,
                status: RstStatus::Other(99),
            },
            Frame::Settings {
                clear: true,
                entries: vec![Setting {
                    flags: 1,
                    id: SETTINGS_INITIAL_WINDOW_SIZE,
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
        ]
    }

    #[test]
    fn every_frame_type_round_trips_through_one_stream() {
        let frames = every_frame_type();
        let mut encoder = FrameEncoder::new().unwrap();
        let mut wire = Vec::new();
        for frame in &frames {
            encoder.encode(frame, &mut wire).unwrap();
        }
        let (decoded, rest) = decode_all(&wire);
        assert!(rest.is_empty());
        assert_eq!(decoded, frames);
    }

    #[test]
    fn fixed_layouts_match_the_draft() {
        let mut encoder = FrameEncoder::new().unwrap();
        let mut wire = Vec::new();
        encoder
            .encode(
                &Frame::WindowUpdate {
                    stream_id: 1,
                    delta: 0x8000,
                },
                &mut wire,
            )
            .unwrap();
        encoder
            .encode(
                &Frame::Data {
                    stream_id: 1,
                    fin: true,
                    data: Bytes::from_static(b"ok"),
                },
                &mut wire,
            )
            .unwrap();
        assert_eq!(
            wire,
            [
                0x80, 3, 0, 9, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0x80, 0, // WINDOW_UPDATE
                0, 0, 0, 1, 1, 0, 0, 2, b'o', b'k', // DATA with FIN
            ]
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: &[(&[u8], &str)] = &[
            (&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1], "version 2"),
            (&[0x80, 3, 0, 6, 0, 0, 0, 3, 0, 0, 1], "short PING"),
            (
                &[0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0],
                "RST status 0",
            ),
            (
                &[0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1],
                "RST stream 0",
            ),
            (
                &[0x80, 3, 0, 4, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
                "SETTINGS count",
            ),
            (&[0x80, 3, 0, 1, 0, 0, 0, 2, 0, 1], "short SYN_STREAM"),
            (
                &[0x80, 3, 0, 2, 0, 0, 0, 6, 0, 0, 0, 1, 0x78, 0x00],
                "bad zlib",
            ),
            (&[0, 0, 0, 0, 0, 0, 0, 1, 0], "DATA on stream 0"),
            (
                &[0x80, 3, 0, 9, 0, 0, 0, 4, 0, 0, 0, 1],
                "short WINDOW_UPDATE",
            ),
        ];
        for (bytes, what) in cases {
            let mut decoder = FrameDecoder::new(Limits::default());
            let result = decoder.decode(&mut BytesMut::from(*bytes));
            assert!(result.is_err(), "{what}: {result:?}");
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_payload_arrives() {
        let mut decoder = FrameDecoder::new(Limits {
            max_payload: 1024,
            max_header_block: 1024,
        });
        let mut buf = BytesMut::from(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(FrameError::FrameTooLarge {
                len: 0xff_ffff,
                limit: 1024
            })
        );
    }

    #[test]
    fn header_blocks_with_lying_lengths_are_errors() {
        let cases: &[&[u8]] = &[
            &[0, 0, 0],
            &[0xff, 0xff, 0xff, 0xff],
            &[0, 0, 0, 1, 0, 0, 0, 9, b'a', 0, 0, 0, 0],
            &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            &[0, 0, 0, 1, 0, 0, 0, 1, b'a', 0, 0, 0, 1, 0xff],
            &[0, 0, 0, 0, 1],
        ];
        for block in cases {
            assert!(decode_header_block(block).is_err(), "{block:?}");
        }
        let ok = decode_header_block(&[0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 3, b'x', 0, b'y']);
        let headers = ok.unwrap();
        assert_eq!(
            headers.get("a"),
            Some("x"),
            "lowercased, first of NUL-separated"
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: xorshift bytes, with and without a valid prefix.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for round in 0..2000 {
            let mut bytes = if round % 2 == 0 {
                RECORDED_PORT_FORWARD[..8 + round % 60].to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..(round % 97) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state as u8);
            }
            let mut decoder = FrameDecoder::new(Limits::default());
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        }
    }
}
