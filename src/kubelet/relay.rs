//! Kubelet requests relayed between node and agent over libp2p streams: a length-
//! prefixed header each way (see [`crate::wire::KubeletRequest`]), then raw bytes.
//! The stream's own flow control (Yamux) gives back-pressure end to end.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{self, MAX_KUBELET_HEADER_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("stream failed")]
    Io(#[from] std::io::Error),
    #[error("header of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

/// Writes one header: a big-endian u32 length, then the message.
pub async fn write_header<T: Serialize>(
    io: &mut (impl AsyncWrite + Unpin),
    message: &T,
) -> Result<(), RelayError> {
    let bytes = wire::encode(message, MAX_KUBELET_HEADER_BYTES)?;
    let len = u32::try_from(bytes.len()).map_err(|_| RelayError::TooLarge(bytes.len()))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one header written by [`write_header`]; a length over the limit is refused
/// before anything is allocated.
pub async fn read_header<T: DeserializeOwned>(
    io: &mut (impl AsyncRead + Unpin),
) -> Result<T, RelayError> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_KUBELET_HEADER_BYTES {
        return Err(RelayError::TooLarge(len));
    }
    let mut bytes = vec![0u8; len];
    io.read_exact(&mut bytes).await?;
    Ok(wire::decode(&bytes, MAX_KUBELET_HEADER_BYTES)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{KubeletAnswer, KubeletRequest, PodUid};

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
}
