//! `kubectl port-forward` at the node: the kubelet's /portForward endpoint over
//! SPDY/3.1 (`portforward.k8s.io`), directly or tunnelled in WebSocket messages
//! (`SPDY/3.1+portforward.k8s.io`, what kubectl 1.30+ tries first), and over plain
//! WebSocket channels (`v4.channel.k8s.io` with `?port=`, what other clients use). Over
//! SPDY each forwarded connection is a pair of streams (error and data) sharing a
//! `requestID`; over channels, each requested port is one connection. Either way its
//! data is relayed to a TCP connection the pod's agent opens to the pod's port.

use std::collections::HashMap;

use futures::{Sink, SinkExt, Stream, StreamExt};
use libp2p::PeerId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::channel::{PortChannel, PortForwardChannels};
use super::relay;
use super::spdy::{self, SpdyStream};
use crate::mesh::MeshHandle;
use crate::wire::{KubeletRequest, PodUid};

/// Bytes read from a pod's connection per message to the client.
const CHUNK: usize = 32 * 1024;

/// Port-forward requests whose data or error stream has not come yet, at most.
const MAX_HALF_PAIRS: usize = 64;

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
        // Half pairs waiting for their other stream: at most as many as a session may
        // have streams, whatever request IDs the client makes up.
        if !pending.contains_key(&request) && pending.len() >= MAX_HALF_PAIRS {
            tracing::debug!(%request, "too many port-forward streams without their pair; refused");
            continue;
        }
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
                Ok(mut io) => relay::splice(&mut data, &mut io)
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

/// Serves port-forward over plain WebSocket channels, as the kubelet's websocket
/// handler: the port prefix first on every channel, then one connection per requested
/// port; the WebSocket closes once every connection has ended. Writes to the client go
/// through one bounded queue, so a slow client slows the pods' connections.
pub async fn serve_channels<W>(
    websocket: W,
    channels: PortForwardChannels,
    mesh: MeshHandle,
    agent: PeerId,
    pod: PodUid,
) where
    W: Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Send + 'static,
{
    let ports = channels.ports().to_vec();
    // Parsing needs no state; the writer's copy tracks which channels got their prefix.
    let parser = channels.clone();
    let (mut sink, mut incoming) = websocket.split();
    let (outgoing, mut queue) = mpsc::channel::<(usize, PortChannel, Vec<u8>)>(16);
    let writer = tokio::spawn(async move {
        let mut channels = channels;
        for message in channels.initial_messages() {
            if sink.send(Message::Binary(message.into())).await.is_err() {
                return;
            }
        }
        while let Some((index, kind, payload)) = queue.recv().await {
            let Ok(message) = channels.message(index, kind, &payload) else {
                continue;
            };
            if sink.send(Message::Binary(message.into())).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let mut to_pod = Vec::with_capacity(ports.len());
    let mut readers = Vec::with_capacity(ports.len());
    for (index, &port) in ports.iter().enumerate() {
        let request = KubeletRequest::PortForward {
            pod: pod.clone(),
            port,
        };
        match relay::request_agent(&mesh, agent, &request).await {
            Ok(io) => {
                let (mut from_pod, writer) = tokio::io::split(io);
                to_pod.push(Some(writer));
                let outgoing = outgoing.clone();
                readers.push(tokio::spawn(async move {
                    let mut buffer = vec![0; CHUNK];
                    while let Ok(n @ 1..) = from_pod.read(&mut buffer).await {
                        let data = buffer[..n].to_vec();
                        if outgoing
                            .send((index, PortChannel::Data, data))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }));
            }
            Err((_, message)) => {
                to_pod.push(None);
                let text = format!("error forwarding port {port} to pod {pod}: {message}");
                let _ = outgoing
                    .send((index, PortChannel::Error, text.into_bytes()))
                    .await;
            }
        }
    }
    // The writer ends (closing the WebSocket) when the last reader does.
    drop(outgoing);
    while let Some(Ok(message)) = incoming.next().await {
        let bytes = match message {
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break,
            _ => continue,
        };
        // Error channels carry server text only; anything else is dropped.
        let Ok(received) = parser.parse(&bytes) else {
            continue;
        };
        if received.kind != PortChannel::Data {
            continue;
        }
        if let Some(slot) = to_pod.get_mut(received.index) {
            if let Some(writer) = slot {
                if writer.write_all(received.payload).await.is_err() {
                    *slot = None;
                }
            }
        }
    }
    // The client is gone: so are its connections.
    for reader in readers {
        reader.abort();
    }
    writer.abort();
}
