//! Prints each pod's phase changes on stdout, one line a change.

use std::collections::HashMap;
use std::io::Write;

use k8s_openapi::api::core::v1::PodStatus;
use k8s_openapi::jiff::Timestamp;
use libp2p::PeerId;

use super::owner::StatusSink;
use crate::wire::{PodRef, PodUid};

pub fn timestamp() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What a person wants to see of a status: the phase, and why it is not running.
fn summary(status: &PodStatus) -> (String, Option<String>) {
    let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
    let reason = status
        .reason
        .as_ref()
        .map(|r| match &status.message {
            Some(m) => format!("{r}: {m}"),
            None => r.clone(),
        })
        .or_else(|| {
            status
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .map(|c| {
                    format!(
                        "{}: {}",
                        c.reason.clone().unwrap_or_default(),
                        c.message.clone().unwrap_or_default()
                    )
                })
        })
        .or_else(|| {
            status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .find_map(|cs| {
                    let waiting = cs.state.as_ref()?.waiting.as_ref()?;
                    let reason = waiting.reason.clone()?;
                    if reason == "ContainerCreating" || reason == "PodInitializing" {
                        return None;
                    }
                    Some(match &waiting.message {
                        Some(m) => format!("{}: {reason}: {m}", cs.name),
                        None => format!("{}: {reason}", cs.name),
                    })
                })
        });
    (phase, reason)
}

/// A [`StatusSink`] for standalone mode: `2026-11-22T19:40:07Z default/web Pending -> Running on 12D3…`.
#[derive(Default)]
pub struct PhasePrinter {
    shown: HashMap<PodUid, (String, Option<String>, Option<PeerId>)>,
}

impl StatusSink for PhasePrinter {
    fn status_changed(&mut self, pod: &PodRef, status: &PodStatus, agent: Option<PeerId>) {
        let (phase, reason) = summary(status);
        let previous = self.shown.get(&pod.uid);
        if previous.is_some_and(|(p, r, a)| *p == phase && *r == reason && *a == agent) {
            return;
        }
        let from = previous.map(|(p, _, _)| p.clone());
        let mut line = match from {
            Some(from) if from != phase => format!("{} {pod} {from} -> {phase}", timestamp()),
            _ => format!("{} {pod} {phase}", timestamp()),
        };
        if let Some(agent) = agent {
            line.push_str(&format!(" on {agent}"));
        }
        if let Some(reason) = &reason {
            line.push_str(&format!(" ({reason})"));
        }
        print_line(&line);
        self.shown.insert(pod.uid.clone(), (phase, reason, agent));
    }

    fn removed(&mut self, pod: &PodRef) {
        self.shown.remove(&pod.uid);
        print_line(&format!("{} {pod} deleted", timestamp()));
    }
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. a pipe whose reader left) must not stop the node.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
