//! The audit trail: one structured log line (target `beemesh::audit`) and one count
//! (`beemesh_audit_events_total{action, outcome}`) per security decision: enrollments,
//! revocations, assignments, refused messages and kubelet API streams.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Whether what was asked was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Audit lines logged per action and outcome per second at most: a flood of refused
/// requests is counted in full but cannot fill the logs (or slow the process writing
/// them). What is left out is said with the next line that gets through.
const LINES_PER_SECOND: u32 = 20;

static LOG_LIMIT: LazyLock<Mutex<LogLimit>> = LazyLock::new(Mutex::default);

#[derive(Default)]
struct LogLimit {
    /// Per action and outcome: the window's start, lines logged in it, lines left out.
    windows: HashMap<(&'static str, Outcome), (Instant, u32, u64)>,
}

impl LogLimit {
    /// Some(lines suppressed since the last one logged) when this line may be logged.
    fn admit(&mut self, action: &'static str, outcome: Outcome, now: Instant) -> Option<u64> {
        let (start, logged, suppressed) =
            self.windows.entry((action, outcome)).or_insert((now, 0, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            (*start, *logged) = (now, 0);
        }
        if *logged >= LINES_PER_SECOND {
            *suppressed += 1;
            return None;
        }
        *logged += 1;
        Some(std::mem::take(suppressed))
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
    let suppressed = match LOG_LIMIT.lock() {
        Ok(mut limit) => match limit.admit(action, outcome, Instant::now()) {
            Some(suppressed) => suppressed,
            None => return,
        },
        Err(_) => 0,
    };
    if suppressed > 0 {
        tracing::warn!(target: "beemesh::audit", action, outcome = outcome.as_str(), suppressed, "audit lines suppressed (each is counted in beemesh_audit_events_total)");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_rate_are_left_out_and_then_said() {
        let mut limit = LogLimit::default();
        let start = Instant::now();
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(limit.admit("query", Outcome::Refused, start), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limit.admit("query", Outcome::Refused, start), None);
        }
        // Another action has its own allowance.
        assert_eq!(limit.admit("bid", Outcome::Refused, start), Some(0));
        let later = start + Duration::from_secs(1);
        assert_eq!(limit.admit("query", Outcome::Refused, later), Some(5));
        assert_eq!(limit.admit("query", Outcome::Refused, later), Some(0));
    }
}
