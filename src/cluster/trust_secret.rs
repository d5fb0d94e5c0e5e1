//! The node's trust store in a cluster: a Secret (the chart creates it), so that
//! enrollments survive the node pod, and `beemesh token` run anywhere with access to
//! the Secret manages the same tokens. The document is the Secret's `trust.json`; the
//! Secret's `join-token`, if any (the chart generates one), is the first token of a
//! document that does not exist yet. Concurrent writers are ordered by the API's
//! resourceVersion: a write that lost a race is applied again to the newer document.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;

use crate::trust::join::{JoinToken, TrustDoc};
use crate::trust::store::{StoreError, TrustStore};

/// The Secret key holding the document.
pub const DOC_KEY: &str = "trust.json";
/// The Secret key of the token the chart generates.
pub const TOKEN_KEY: &str = "join-token";
/// Lost races retried at most.
const MAX_ATTEMPTS: usize = 8;

#[derive(Clone)]
pub struct SecretTrustStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for SecretTrustStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.place())
    }
}

impl SecretTrustStore {
    /// The Secret `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        SecretTrustStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn error(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Remote {
            place: self.place(),
            reason: reason.to_string(),
        }
    }

    async fn get(&self) -> Result<Secret, StoreError> {
        self.api.get(&self.name).await.map_err(|e| match e {
            kube::Error::Api(status) if status.code == 404 => self.error(
                "no such Secret: create it (the Helm chart does) or name another with \
                 --trust-secret",
            ),
            other => self.error(format!("cannot read it: {other}")),
        })
    }

    /// The document the Secret holds.
    fn doc(&self, secret: &Secret) -> Result<TrustDoc, StoreError> {
        let data = secret.data.as_ref();
        if let Some(doc) = data.and_then(|d| d.get(DOC_KEY)) {
            return serde_json::from_slice(&doc.0)
                .map_err(|e| self.error(format!("{DOC_KEY} is not valid: {e}")));
        }
        let mut doc = TrustDoc::default();
        if let Some(token) = data.and_then(|d| d.get(TOKEN_KEY)) {
            let token: JoinToken = String::from_utf8_lossy(&token.0)
                .parse()
                .map_err(|e| self.error(format!("{TOKEN_KEY}: {e}")))?;
            let created = secret
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| u64::try_from(t.0.as_second()).unwrap_or(0));
            doc.create_token(&token, created, 0, None);
        }
        Ok(doc)
    }
}

#[async_trait::async_trait]
impl TrustStore for SecretTrustStore {
    fn place(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    async fn load(&self) -> Result<TrustDoc, StoreError> {
        let secret = self.get().await?;
        self.doc(&secret)
    }

    async fn update(
        &self,
        change: &mut (dyn for<'d> FnMut(&'d mut TrustDoc) + Send),
    ) -> Result<TrustDoc, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let mut secret = self.get().await?;
            let before = self.doc(&secret)?;
            let mut doc = before.clone();
            change(&mut doc);
            let stored = secret
                .data
                .as_ref()
                .is_some_and(|d| d.contains_key(DOC_KEY));
            if doc == before && stored {
                return Ok(doc);
            }
            let bytes = serde_json::to_vec(&doc).map_err(|e| self.error(e))?;
            secret
                .data
                .get_or_insert_with(BTreeMap::new)
                .insert(DOC_KEY.into(), ByteString(bytes));
            // The resourceVersion read above makes the API refuse the write if another
            // writer came first.
            match self
                .api
                .replace(&self.name, &PostParams::default(), &secret)
                .await
            {
                Ok(_) => return Ok(doc),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(self.error(format!("cannot write it: {e}"))),
            }
        }
        Err(self.error("too many concurrent writers; try again"))
    }
}
