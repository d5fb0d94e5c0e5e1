//! A Service's UDP port at the gateway: each client address is a flow with its own
//! stream to the pod's agent (so replies go back to the client that asked, as
//! kube-proxy's conntrack entries do), ended after [`FLOW_IDLE`] without a datagram
//! either way. Flows and their queues are bounded; what does not fit is dropped and
//! counted, as a full socket buffer drops datagrams.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::endpoints::Target;
use super::{open, Relay};
use crate::kubelet::relay::{read_datagram, write_datagram, MAX_DATAGRAM};

/// A flow ends after this long without a datagram either way (the kernel's conntrack
/// keeps a UDP entry with replies 120 s; DNS and metrics flows are far shorter).
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Flows at once per port; a datagram from one more client is dropped.
pub const MAX_FLOWS: usize = 1024;
/// Datagrams from a client waiting for its stream, at most.
const FLOW_QUEUE: usize = 64;

/// Serves the UDP port until stopped.
pub async fn serve(socket: UdpSocket, target: Target, relay: Relay, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let mut flows: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = tokio::select! {
            _ = stop.cancelled() => return,
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(e) => {
                    tracing::debug!(error = %e, "gateway UDP receive failed");
                    continue;
                }
            },
        };
        flows.retain(|_, queue| !queue.is_closed());
        let queue = match flows.get(&client) {
            Some(queue) => queue.clone(),
            None if flows.len() >= MAX_FLOWS => {
                relay.metrics.gateway_connection("refused");
                continue;
            }
            None => {
                let (queue, datagrams) = mpsc::channel(FLOW_QUEUE);
                let flow = Flow {
                    socket: socket.clone(),
                    client,
                    target: target.clone(),
                    relay: relay.clone(),
                };
                tokio::spawn(flow.run(datagrams, stop.clone()));
                flows.insert(client, queue.clone());
                queue
            }
        };
        if queue.try_send(buffer[..len].to_vec()).is_err() {
            relay.metrics.dropped("gateway_datagram", "queue_full");
        }
    }
}

struct Flow {
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    target: Target,
    relay: Relay,
}

impl Flow {
    async fn run(self, datagrams: mpsc::Receiver<Vec<u8>>, stop: CancellationToken) {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = self.relay_flow(datagrams) => outcome,
        };
        match outcome {
            Ok(()) => self.relay.metrics.gateway_connection("relayed"),
            Err(reason) => {
                self.relay.metrics.gateway_connection("refused");
                tracing::debug!(client = %self.client, pod = %self.target.pod, port = self.target.port, %reason, "gateway UDP flow not relayed");
            }
        }
    }

    async fn relay_flow(&self, mut datagrams: mpsc::Receiver<Vec<u8>>) -> Result<(), String> {
        let stream = open(&self.target, &self.relay, self.client.ip()).await?;
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut reply = Vec::new();
        loop {
            tokio::select! {
                datagram = datagrams.recv() => match datagram {
                    Some(datagram) => write_datagram(&mut writer, &datagram)
                        .await
                        .map_err(|e| e.to_string())?,
                    None => return Ok(()),
                },
                read = read_datagram(&mut reader, &mut reply) => match read.map_err(|e| e.to_string())? {
                    // A lost reply is lost, as with UDP.
                    Some(_) => {
                        let _ = self.socket.send_to(&reply, self.client).await;
                    }
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(FLOW_IDLE) => return Ok(()),
            }
        }
    }
}
