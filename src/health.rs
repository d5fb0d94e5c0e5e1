//! The node's plain-HTTP health endpoint, like the kubelet's healthz port (10248): what
//! liveness and readiness probes call. It tells only whether the node works, never
//! anything about pods, so unlike the kubelet API it needs no authentication.
//!
//! - `/healthz` (liveness): the node loop answers a query within [`LOOP_TIMEOUT`].
//! - `/readyz` (readiness): that, and every registered [`Check`] passes (the kubelet
//!   API is serving; in a cluster, the Node is registered and its Lease renewed).
//!
//! Both answer like the API server's own health endpoints: `ok` with 200, or one
//! `[+]name ok` / `[-]name failed: reason` line per check and 500.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::Filter;

use crate::node::NodeDirectory;

/// How long the node loop may take to answer before the node counts as stuck.
pub const LOOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Each check's name and state: passing, or failing with a reason.
type Results = Vec<(&'static str, Result<(), String>)>;

/// The health checks of one process. Cheap to clone.
#[derive(Clone)]
pub struct Health {
    directory: NodeDirectory,
    checks: Arc<Mutex<Results>>,
}

/// One readiness condition, failing ("not yet") until it is passed.
#[derive(Clone)]
pub struct Check {
    name: &'static str,
    checks: Arc<Mutex<Results>>,
}

impl Check {
    pub fn pass(&self) {
        self.set(Ok(()));
    }

    pub fn fail(&self, reason: impl Into<String>) {
        self.set(Err(reason.into()));
    }

    fn set(&self, state: Result<(), String>) {
        let mut checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, current)) = checks.iter_mut().find(|(name, _)| *name == self.name) {
            *current = state;
        }
    }
}

impl Health {
    pub fn new(directory: NodeDirectory) -> Health {
        Health {
            directory,
            checks: Arc::default(),
        }
    }

    /// Adds a readiness condition; it fails with "not yet" until passed.
    pub fn check(&self, name: &'static str) -> Check {
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((name, Err("not yet".into())));
        Check {
            name,
            checks: self.checks.clone(),
        }
    }

    async fn liveness(&self) -> Results {
        let answered = tokio::time::timeout(LOOP_TIMEOUT, self.directory.alive()).await;
        let state = match answered {
            Ok(true) => Ok(()),
            Ok(false) => Err("the node loop has stopped".into()),
            Err(_) => Err(format!(
                "the node loop did not answer within {}s",
                LOOP_TIMEOUT.as_secs()
            )),
        };
        vec![("node-loop", state)]
    }

    async fn readiness(&self) -> Results {
        let mut results = self.liveness().await;
        results.extend(
            self.checks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned(),
        );
        results
    }

    /// Serves `/healthz` and `/readyz` on an already bound listener until `cancel`.
    pub async fn serve(self, listener: TcpListener, cancel: CancellationToken) {
        let live = self.clone();
        let healthz = warp::path!("healthz").and(warp::get()).then(move || {
            let health = live.clone();
            async move { reply(&health.liveness().await) }
        });
        let readyz = warp::path!("readyz").and(warp::get()).then(move || {
            let health = self.clone();
            async move { reply(&health.readiness().await) }
        });
        warp::serve(healthz.or(readyz))
            .incoming(listener)
            .graceful(async move { cancel.cancelled().await })
            .run()
            .await;
    }
}

fn reply(results: &Results) -> warp::reply::WithStatus<String> {
    let (status, body) = report(results);
    warp::reply::with_status(body, status)
}

/// The response for a set of check results.
fn report(results: &Results) -> (StatusCode, String) {
    if results.iter().all(|(_, state)| state.is_ok()) {
        return (StatusCode::OK, "ok".into());
    }
    let mut body = String::new();
    for (name, state) in results {
        match state {
            Ok(()) => body.push_str(&format!("[+]{name} ok\n")),
            Err(reason) => body.push_str(&format!("[-]{name} failed: {reason}\n")),
        }
    }
    body.push_str("check failed\n");
    (StatusCode::INTERNAL_SERVER_ERROR, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_passing_is_a_plain_ok() {
        let (status, body) = report(&vec![("a", Ok(())), ("b", Ok(()))]);
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }

    #[test]
    fn a_failing_check_is_named_with_its_reason() {
        let (status, body) = report(&vec![("a", Ok(())), ("b", Err("not yet".into()))]);
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body, "[+]a ok\n[-]b failed: not yet\ncheck failed\n");
    }

    #[tokio::test]
    async fn checks_fail_until_passed_and_follow_their_last_state() {
        let (directory, _queries) = NodeDirectory::new();
        let health = Health::new(directory);
        let api = health.check("kubelet-api");
        let state = || health.checks.lock().unwrap()[0].1.clone();
        assert_eq!(state(), Err("not yet".into()));
        api.pass();
        assert_eq!(state(), Ok(()));
        api.fail("lease not renewed");
        assert_eq!(state(), Err("lease not renewed".into()));
    }

    #[tokio::test]
    async fn a_stopped_node_loop_fails_liveness() {
        let (directory, queries) = NodeDirectory::new();
        drop(queries);
        let results = Health::new(directory).liveness().await;
        assert_eq!(
            results,
            vec![("node-loop", Err("the node loop has stopped".into()))]
        );
    }
}
