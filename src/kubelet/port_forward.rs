//! `kubectl port-forward` at the node: the kubelet's /portForward endpoint over
//! SPDY/3.1 (`portforward.k8s.io`), directly or tunnelled in WebSocket messages
//! (`SPDY/3.1+portforward.k8s.io`, what kubectl 1.30+ tries first). Each forwarded
//! connection is a pair of streams (error and data) sharing a `requestID`; its data is
//! relayed to a TCP connection the pod's agent opens to the pod's port.

use std::collections::HashMap;

use libp2p::PeerId;
use tokio::io::AsyncWriteExt;

use super::relay;
use super::spdy::{self, SpdyStream};
use crate::mesh::MeshHandle;
use crate::wire::{KubeletRequest, PodUid};

/// Serves one port-forward session until the client closes it.
pub async fn serve<T>(upgraded: T, mesh: MeshHandle, agent: PeerId, pod: PodUid)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (session, mut incoming) = spdy::accept(upgraded);
    let mut pending: HashMap<String, (Option<SpdyStream>, Option<SpdyStream>)> = HashMap::new();
    while let Some(stream) = incoming.recv().await {
        let headers = stream.headers();
        let request = headers.get("requestid").unwrap_or_default().to_owned();
        let kind = headers.get("streamtype").unwrap_or_default().to_owned();
        let entry = pending.entry(request.clone()).or_default();
        match kind.as_str() {
            "error" => entry.0 = Some(stream),
            "data" => entry.1 = Some(stream),
            _ => continue,
        }
        if let (Some(_), Some(_)) = entry {
            if let Some((Some(error), Some(data))) = pending.remove(&request) {
                tokio::spawn(forward(mesh.clone(), agent, pod.clone(), error, data));
            }
        }
    }
    session.close();
}

/// One forwarded connection: the data stream to the pod's port, failures as text on
/// the error stream (what kubectl prints).
async fn forward(
    mesh: MeshHandle,
    agent: PeerId,
    pod: PodUid,
    error: SpdyStream,
    mut data: SpdyStream,
) {
    let (_error_reader, mut error_writer) = error.into_split();
    let port = data
        .headers()
        .get("port")
        .and_then(|p| p.parse::<u16>().ok());
    let outcome = match port {
        None => Err("invalid or missing port header".to_owned()),
        Some(port) => {
            match relay::request_agent(&mesh, agent, &KubeletRequest::PortForward { pod, port })
                .await
            {
                Ok(mut io) => tokio::io::copy_bidirectional(&mut data, &mut io)
                    .await
                    .map(drop)
                    .map_err(|e| format!("error forwarding port {port}: {e}")),
                Err((_, message)) => Err(message),
            }
        }
    };
    if let Err(message) = outcome {
        let _ = error_writer.write_all(message.as_bytes()).await;
    }
    let _ = error_writer.shutdown().await;
    let _ = data.shutdown().await;
}
