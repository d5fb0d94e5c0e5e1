//! The node's side of enrollment: answers agents' joins from its trust store, and
//! follows the store (tokens revoked with `beemesh token revoke` drop their agents).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Outcome};
use crate::mesh::MeshHandle;
use crate::metrics::Metrics;
use crate::trust::join::{JoinError, NonceBook, TrustDoc};
use crate::trust::replay::unix_millis;
use crate::trust::store::{StoreError, TrustStore};
use crate::trust::TrustedPeers;
use crate::wire::{JoinRequest, Response};

/// How often the store is read again for revocations.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Joins are checked against the store as read at most this long ago, so that a flood
/// of bad requests costs no more than one read of the store a second (an API request,
/// in a cluster); only a request that proves a token leads to a write.
const MAX_DOC_AGE: Duration = Duration::from_secs(1);

/// The store as last read, and when.
type LastRead = Option<(TrustDoc, tokio::time::Instant)>;

/// Cheap to clone: one store, one nonce book and one set of trusted agents for all.
#[derive(Clone)]
pub struct NodeEnrollment {
    store: Arc<dyn TrustStore>,
    agents: TrustedPeers,
    nonces: Arc<Mutex<NonceBook>>,
    last_read: Arc<tokio::sync::Mutex<LastRead>>,
    metrics: Metrics,
    mesh: MeshHandle,
}

impl std::fmt::Debug for NodeEnrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEnrollment")
            .field("store", &self.store.place())
            .finish_non_exhaustive()
    }
}

impl NodeEnrollment {
    /// Enrollment from `store` into `agents`, which already holds the agents the store
    /// had enrolled at start.
    pub fn new(
        store: Arc<dyn TrustStore>,
        agents: TrustedPeers,
        metrics: Metrics,
        mesh: MeshHandle,
    ) -> Self {
        NodeEnrollment {
            store,
            agents,
            nonces: Arc::default(),
            last_read: Arc::default(),
            metrics,
            mesh,
        }
    }

    /// Answers a join: enrolls the agent (persisted first) and proves the token back.
    pub async fn join(&self, agent: PeerId, request: JoinRequest) -> Response {
        let checked = self
            .nonces
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .check(&request, unix_millis());
        let result = match checked {
            Ok(()) => self.accept(agent, &request).await,
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok((proof, new)) => {
                self.agents.enroll(agent);
                self.mesh.trust_changed().await;
                let what = if new {
                    "agent enrolled"
                } else {
                    "agent already enrolled"
                };
                audit::record(
                    &self.metrics,
                    "join",
                    Outcome::Allowed,
                    &agent,
                    None,
                    &format_args!("{what} with token {}", request.token_id),
                );
                Response::Joined { proof }
            }
            Err(reason) => {
                self.metrics.dropped("join", "refused");
                audit::record(
                    &self.metrics,
                    "join",
                    Outcome::Refused,
                    &agent,
                    None,
                    &format_args!("token {}: {reason}", request.token_id),
                );
                Response::Declined { reason }
            }
        }
    }

    async fn accept(&self, agent: PeerId, request: &JoinRequest) -> Result<(String, bool), String> {
        let now = unix_millis() / 1000;
        let me = self.mesh.local_peer_id();
        let unavailable = |e: StoreError| {
            tracing::error!(error = %e, "cannot read or record enrollments");
            "the node cannot record enrollments now; try again".to_string()
        };
        self.read(MAX_DOC_AGE)
            .await
            .map_err(unavailable)?
            .verify(request, &agent, &me, now)
            .map_err(|e| e.to_string())?;
        let mut outcome: Result<_, JoinError> = Err(JoinError::UnknownToken);
        let written = self
            .store
            .update(&mut |doc| outcome = doc.accept(request, &agent, &me, now))
            .await;
        // Read afresh next time, whatever the write did.
        *self.last_read.lock().await = None;
        written.map_err(unavailable)?;
        outcome
            .map(|accepted| (accepted.proof, accepted.new))
            .map_err(|e| e.to_string())
    }

    /// The store's document as read at most `max_age` ago.
    async fn read(&self, max_age: Duration) -> Result<TrustDoc, StoreError> {
        let mut last = self.last_read.lock().await;
        if let Some((doc, _)) = last.as_ref().filter(|(_, at)| at.elapsed() < max_age) {
            return Ok(doc.clone());
        }
        let doc = self.store.load().await?;
        *last = Some((doc.clone(), tokio::time::Instant::now()));
        Ok(doc)
    }

    /// Reads the store; returns the agents whose trust was revoked since.
    async fn reload(&self) -> Result<Vec<PeerId>, StoreError> {
        let doc = self.read(Duration::ZERO).await?;
        Ok(self.agents.set_enrolled(doc.enrolled().collect::<Vec<_>>()))
    }

    /// Follows the store until cancelled, sending each batch of revoked agents.
    pub async fn follow(self, revoked: mpsc::Sender<Vec<PeerId>>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload().await {
                Ok(gone) if gone.is_empty() => {}
                Ok(gone) => {
                    for agent in &gone {
                        audit::record(
                            &self.metrics,
                            "revoke",
                            Outcome::Allowed,
                            agent,
                            None,
                            &format_args!("enrollment removed from {}", self.store.place()),
                        );
                    }
                    if revoked.send(gone).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(store = %self.store.place(), error = %e, "cannot read the trust store; keeping the agents trusted so far")
                }
            }
        }
    }
}
