//! Mesh pods to mesh pods: a pod's connection to a standalone Service goes, through
//! its agent, straight to the agent of the endpoint its owner picked, over a
//! [`DIRECT_PROTOCOL`] stream that carries the owner's signed grant ([`SignedDial`]).
//! This agent connects a granted stream to its pod's port (the pod's own owner must
//! have signed it: an owner this agent trusts, that placed that pod here); anything
//! else is refused. An endpoint on this very agent is connected to without the mesh.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use super::addresses::PodAddresses;
use super::kubelet::reach_pod;
use crate::audit::{self, Outcome};
use crate::kubelet::relay::{answer_and_splice, read_header};
use crate::mesh::{MeshError, MeshHandle};
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::trust::dial;
use crate::trust::TrustedPeers;
use crate::wire::{KubeletAnswer, SignedDial, DIRECT_PROTOCOL};

/// Granted connections served at once; streams beyond are closed.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long a peer has to send its grant once its stream is open.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The pods of this agent as granted connections reach them. Cheap to clone.
#[derive(Clone)]
pub struct DirectEndpoints {
    pub runtime: Arc<dyn Runtime>,
    pub addresses: PodAddresses,
    pub owners: TrustedPeers,
    pub me: PeerId,
    pub metrics: Metrics,
}

impl DirectEndpoints {
    /// A connection to the granted pod port, for `peer` (this agent, for one of its own
    /// pods' connections), or the refusal.
    pub async fn connect(
        &self,
        grant: &SignedDial,
        peer: PeerId,
    ) -> Result<TcpStream, KubeletAnswer> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let refused = |code, message: String| KubeletAnswer::Failed { code, message };
        if !self.owners.trusts(&grant.owner.0) {
            return Err(refused(
                403,
                format!("owner {} is not trusted by this agent", grant.owner.0),
            ));
        }
        dial::verify(grant, &peer, &self.me, now).map_err(|e| refused(403, e.to_string()))?;
        // Only a pod of the owner that signed: another owner's pods are not its to open.
        reach_pod(
            self.runtime.as_ref(),
            &self.addresses,
            grant.owner.0,
            &grant.pod,
            grant.port,
            "connect to",
            TcpStream::connect,
        )
        .await
    }

    /// Accepts granted streams from other agents until cancelled.
    pub async fn serve(self, mesh: MeshHandle, cancel: CancellationToken) -> Result<(), MeshError> {
        let mut incoming = mesh.accept_streams(StreamProtocol::new(DIRECT_PROTOCOL))?;
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                next = incoming.next() => next,
            };
            let Some((peer, stream)) = next else {
                return Ok(());
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                self.metrics.dropped("direct_stream", "too_many");
                continue;
            };
            let (endpoints, cancel) = (self.clone(), cancel.clone());
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    result = endpoints.handle(peer, stream) => if let Err(reason) = result {
                        tracing::debug!(%peer, %reason, "direct connection not served");
                    },
                }
            });
        }
    }

    async fn handle(&self, peer: PeerId, stream: libp2p::Stream) -> Result<(), String> {
        let mut io = stream.compat();
        let grant: SignedDial = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut io))
            .await
            .map_err(|_| "no grant in time".to_owned())?
            .map_err(|e| e.to_string())?;
        let connected = self.connect(&grant, peer).await;
        if let Err(refusal) = &connected {
            let reason = match refusal {
                KubeletAnswer::Failed { message, .. } => message.as_str(),
                KubeletAnswer::Ok => "",
            };
            self.metrics.dropped("direct_stream", "refused");
            audit::record(
                &self.metrics,
                "direct_stream",
                Outcome::Refused,
                &peer,
                Some(&grant.pod),
                &reason,
            );
        }
        answer_and_splice(&mut io, connected).await
    }
}
