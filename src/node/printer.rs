//! Prints each pod's visible changes on stdout, one line a change.

use std::collections::HashMap;
use std::io::Write;

use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
use k8s_openapi::jiff::Timestamp;
use libp2p::PeerId;

use super::display::{pod_display, PodDisplay};
use super::owner::StatusSink;
use crate::wire::{AgentEvent, PodRef, PodUid};

pub fn timestamp() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A [`StatusSink`] for standalone mode, one line a change a person would see:
/// `2026-11-22T19:40:07Z default/web Pending -> Running 1/1 ready on 12D3…`. A line is
/// never printed twice in a row for a pod.
#[derive(Default)]
pub struct PhasePrinter {
    shown: HashMap<PodUid, Shown>,
}

#[derive(PartialEq)]
struct Shown {
    display: PodDisplay,
    agent: Option<PeerId>,
}

impl StatusSink for PhasePrinter {
    fn status_changed(
        &mut self,
        pod: &PodRef,
        spec: Option<&PodSpec>,
        status: &PodStatus,
        agent: Option<PeerId>,
    ) {
        let now = Shown {
            display: pod_display(spec, status, false),
            agent,
        };
        let previous = self.shown.get(&pod.uid);
        if previous == Some(&now) {
            return;
        }
        let shown = &now.display;
        let mut line = match previous.map(|p| &p.display.status) {
            Some(from) if *from != shown.status => {
                format!("{} {pod} {from} -> {}", timestamp(), shown.status)
            }
            _ => format!("{} {pod} {}", timestamp(), shown.status),
        };
        line.push_str(&format!(" {}/{} ready", shown.ready, shown.containers));
        if shown.restarts > 0 {
            line.push_str(&format!(", {} restarts", shown.restarts));
        }
        if let Some(agent) = agent {
            line.push_str(&format!(" on {agent}"));
        }
        if let Some(message) = &shown.message {
            line.push_str(&format!(" ({message})"));
        }
        print_line(&line);
        self.shown.insert(pod.uid.clone(), now);
    }

    fn removed(&mut self, pod: &PodRef) {
        self.shown.remove(&pod.uid);
        print_line(&format!("{} {pod} deleted", timestamp()));
    }

    /// Warnings only (`… default/web Unhealthy: Liveness probe failed: …`): the normal
    /// ones repeat what the status lines say.
    fn events(&mut self, pod: &PodRef, events: &[AgentEvent]) {
        for event in events {
            if let Some((reason, true)) = event.reason.kubernetes() {
                print_line(&format!(
                    "{} {pod} {reason}: {}",
                    timestamp(),
                    event.message
                ));
            }
        }
    }
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. a pipe whose reader left) must not stop the node.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
