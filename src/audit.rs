//! The audit trail: one structured log line (target `beemesh::audit`) and one count
//! (`beemesh_audit_events_total{action, outcome}`) per security decision: enrollments,
//! revocations, assignments, refused messages and kubelet API streams.

use std::fmt::Display;

use crate::metrics::Metrics;

/// Whether what was asked was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Refused => "refused",
        }
    }
}

/// Records one decision: `action` is a fixed word (join, revoke, assign, bid, status,
/// heartbeat, query, logs, exec, ...), `peer` who asked, `pod` what it concerned.
pub fn record(
    metrics: &Metrics,
    action: &'static str,
    outcome: Outcome,
    peer: &dyn Display,
    pod: Option<&dyn Display>,
    reason: &dyn Display,
) {
    metrics.audited(action, outcome.as_str());
    let pod = pod.map(ToString::to_string).unwrap_or_default();
    match outcome {
        Outcome::Allowed => {
            tracing::info!(target: "beemesh::audit", action, outcome = outcome.as_str(), %peer, pod, %reason)
        }
        Outcome::Refused => {
            tracing::warn!(target: "beemesh::audit", action, outcome = outcome.as_str(), %peer, pod, %reason)
        }
    }
}
