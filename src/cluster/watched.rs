//! Objects watched into kube-runtime reflector stores, each with a readiness signal
//! that any number of tasks may wait on (`Store::wait_until_ready` wakes only the last
//! task to wait on it, so a second waiter would wait forever).

use std::sync::Arc;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::WatchStreamExt;
use kube::Resource;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// A watched store, cheap to clone.
#[derive(Clone)]
pub struct Watched<K: Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    listed: watch::Receiver<bool>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Watched<K> {
    /// Whether the first full listing is in the store.
    pub fn is_listed(&self) -> bool {
        *self.listed.borrow()
    }

    /// Waits for the first full listing; false if the watch ended before it.
    pub async fn listed(&self) -> bool {
        self.listed.clone().wait_for(|listed| *listed).await.is_ok()
    }
}

/// Watches `api` into a store, telling `changed` after every event, until cancelled;
/// the watcher starts over after errors with its back-off.
pub fn watch_into_store<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: Arc<Notify>,
    cancel: CancellationToken,
) -> Watched<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
    K: serde::de::DeserializeOwned,
{
    let (store, writer) = reflector::store::<K>();
    let (listed_tx, listed) = watch::channel(false);
    tokio::spawn(async move {
        let events = reflector::reflector(writer, watcher(api, config)).default_backoff();
        let mut events = std::pin::pin!(events);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                None => return,
                Some(Ok(event)) => {
                    if matches!(event, watcher::Event::InitDone) {
                        listed_tx.send_replace(true);
                    }
                    changed.notify_one();
                }
                Some(Err(e)) => {
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying")
                }
            }
        }
    });
    Watched { store, listed }
}
