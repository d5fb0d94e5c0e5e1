//! Request-response framing: one length-prefixed, size-capped frame per message.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

use crate::metrics::Metrics;
use crate::wire::{self, Request, Response, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};

/// Reads and writes [`Request`]/[`Response`] frames: a 4-byte big-endian length, then
/// the versioned JSON envelope. A frame over its limit is refused before it is read.
///
/// Frames that cannot be decoded are counted here: request-response drops a stream
/// whose request fails to read without telling the behaviour's user.
#[derive(Clone, Default)]
pub struct WireCodec {
    metrics: Metrics,
}

impl WireCodec {
    pub fn new(metrics: Metrics) -> Self {
        WireCodec { metrics }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        frame: io::Result<Vec<u8>>,
        limit: usize,
    ) -> io::Result<T> {
        let result = frame.and_then(|bytes| wire::decode(&bytes, limit).map_err(invalid));
        if let Err(e) = &result {
            let reason = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<wire::WireError>())
                .map_or("io", wire::WireError::kind);
            self.metrics.dropped(kind, reason);
        }
        result
    }
}

/// A frame's buffer starts this large at most, whatever length it declares.
const INITIAL_FRAME_CAPACITY: usize = 64 << 10;

async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, limit: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            wire::WireError::TooLarge { size: len, limit },
        ));
    }
    read_declared(io, len).await
}

/// Reads the `len` bytes a peer declared (already checked against a limit) into a
/// buffer grown as they arrive: a peer that declares the limit and sends little gets
/// little memory.
pub async fn read_declared<T: AsyncRead + Unpin>(io: &mut T, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len.min(INITIAL_FRAME_CAPACITY));
    (&mut *io).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame ended after {} of {len} bytes", buf.len()),
        ));
    }
    Ok(buf)
}

async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, bytes: &[u8]) -> io::Result<()> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

fn invalid(e: wire::WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl libp2p::request_response::Codec for WireCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, MAX_REQUEST_BYTES).await;
        self.decode("request", frame, MAX_REQUEST_BYTES)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, MAX_RESPONSE_BYTES).await;
        self.decode("response", frame, MAX_RESPONSE_BYTES)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = wire::encode(&req, MAX_REQUEST_BYTES).map_err(invalid)?;
        write_frame(io, &bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = wire::encode(&res, MAX_RESPONSE_BYTES).map_err(invalid)?;
        write_frame(io, &bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use libp2p::request_response::Codec;

    fn protocol() -> StreamProtocol {
        StreamProtocol::new(wire::REQUEST_PROTOCOL)
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut codec = WireCodec::default();
        let mut buf = Cursor::new(Vec::new());
        codec
            .write_request(&protocol(), &mut buf, Request::Query)
            .await
            .expect("writes");
        let mut read = Cursor::new(buf.into_inner());
        let req = codec
            .read_request(&protocol(), &mut read)
            .await
            .expect("reads");
        assert_eq!(req, Request::Query);
    }

    #[tokio::test]
    async fn oversized_length_prefix_is_refused_before_reading() {
        let mut codec = WireCodec::default();
        let mut frame = ((MAX_REQUEST_BYTES + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let err = codec
            .read_request(&protocol(), &mut Cursor::new(frame))
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_frame_shorter_than_it_declares_ends_the_read_without_its_declared_buffer() {
        let mut frame = (MAX_REQUEST_BYTES as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{\"v\":1}");
        let err = read_frame(&mut Cursor::new(frame), MAX_REQUEST_BYTES)
            .await
            .expect_err("short");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("after 7 of"), "{err}");
        // A frame larger than the first buffer still reads whole.
        let big = vec![b'x'; INITIAL_FRAME_CAPACITY * 3 + 5];
        let mut frame = (big.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&big);
        let read = read_frame(&mut Cursor::new(frame), MAX_REQUEST_BYTES)
            .await
            .expect("whole");
        assert_eq!(read, big);
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let mut codec = WireCodec::default();
        for frame in [vec![0, 0], vec![0, 0, 0, 9, b'{'], {
            let mut f = 5u32.to_be_bytes().to_vec();
            f.extend_from_slice(b"hello");
            f
        }] {
            assert!(codec
                .read_request(&protocol(), &mut Cursor::new(frame))
                .await
                .is_err());
        }
    }
}
