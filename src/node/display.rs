//! A pod as `kubectl get pods` shows it: the STATUS, READY and RESTARTS columns worked
//! out from the pod's spec and status the way kubectl's printer does (`printPod` in
//! kubernetes/pkg/printers/internalversion), plus the reason a person needs when the
//! pod is not running.

use k8s_openapi::api::core::v1::{
    ContainerStateTerminated, ContainerStatus, PodCondition, PodSpec, PodStatus,
};

use crate::runtime::translate;

/// What a person sees of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDisplay {
    /// kubectl's STATUS: the phase, or what keeps the pod from it (`Init:0/1`,
    /// `CrashLoopBackOff`, `Completed`, `Terminating`, ...).
    pub status: String,
    pub ready: u32,
    pub containers: u32,
    pub restarts: u32,
    /// Why, in words, when the status alone does not say it.
    pub message: Option<String>,
}

/// The pod as kubectl shows it; `deleting` stands for a deletion timestamp.
pub fn pod_display(spec: Option<&PodSpec>, status: &PodStatus, deleting: bool) -> PodDisplay {
    let init_specs = spec
        .and_then(|s| s.init_containers.as_deref())
        .unwrap_or(&[]);
    let is_sidecar = |name: &str| {
        init_specs
            .iter()
            .any(|c| c.name == name && translate::is_sidecar(c))
    };
    // Without the spec (a status alone), the containers the status lists.
    let containers = spec.map_or(
        status.container_statuses.as_ref().map_or(0, Vec::len),
        |s| s.containers.len(),
    ) + init_specs
        .iter()
        .filter(|c| translate::is_sidecar(c))
        .count();
    let phase = status.phase.clone().unwrap_or_else(|| "Pending".into());
    let mut shown = status.reason.clone().unwrap_or(phase);
    let mut restarts = 0;
    // kubectl counts a sidecar's restarts with the app containers'.
    let mut sidecar_restarts = 0;
    let mut ready = 0;
    let mut initializing = false;
    let init_statuses = status.init_container_statuses.as_deref().unwrap_or(&[]);
    for (i, container) in init_statuses.iter().enumerate() {
        restarts += container.restart_count.max(0) as u32;
        if is_sidecar(&container.name) {
            sidecar_restarts += container.restart_count.max(0) as u32;
        }
        let state = container.state.clone().unwrap_or_default();
        if state.terminated.as_ref().is_some_and(|t| t.exit_code == 0) {
            continue;
        }
        if is_sidecar(&container.name) && container.started == Some(true) {
            if container.ready {
                ready += 1;
            }
            continue;
        }
        shown = match (&state.terminated, &state.waiting) {
            (Some(terminated), _) => format!("Init:{}", terminated_reason(terminated)),
            (None, Some(waiting))
                if waiting
                    .reason
                    .as_deref()
                    .is_some_and(|r| !r.is_empty() && r != "PodInitializing") =>
            {
                format!("Init:{}", waiting.reason.as_deref().unwrap_or_default())
            }
            _ => format!("Init:{i}/{}", init_specs.len()),
        };
        initializing = true;
        break;
    }
    let initialized = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Initialized" && c.status == "True");
    if !initializing || initialized {
        restarts = sidecar_restarts;
        let mut has_running = false;
        for container in status.container_statuses.iter().flatten().rev() {
            restarts += container.restart_count.max(0) as u32;
            let state = container.state.clone().unwrap_or_default();
            match (&state.waiting, &state.terminated) {
                (Some(waiting), _) if waiting.reason.as_deref().is_some_and(|r| !r.is_empty()) => {
                    shown = waiting.reason.clone().unwrap_or_default();
                }
                (_, Some(terminated)) => shown = terminated_reason(terminated),
                _ if container.ready && state.running.is_some() => {
                    has_running = true;
                    ready += 1;
                }
                _ => {}
            }
        }
        if shown == "Completed" && has_running {
            let pod_ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            shown = if pod_ready { "Running" } else { "NotReady" }.into();
        }
    }
    let terminal = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if deleting && status.reason.as_deref() == Some("NodeLost") {
        shown = "Unknown".into();
    } else if deleting && !terminal {
        shown = "Terminating".into();
    }
    PodDisplay {
        status: shown,
        ready,
        containers: containers as u32,
        restarts,
        message: message(status),
    }
}

/// A terminated container's reason, or its signal or exit code, as kubectl says it.
fn terminated_reason(terminated: &ContainerStateTerminated) -> String {
    match (&terminated.reason, terminated.signal) {
        (Some(reason), _) if !reason.is_empty() => reason.clone(),
        (_, Some(signal)) if signal != 0 => format!("Signal:{signal}"),
        _ => format!("ExitCode:{}", terminated.exit_code),
    }
}

/// Why the pod is not running, when anything says: the pod's own message, the
/// scheduling condition's, or a container's (a pull error, say).
fn message(status: &PodStatus) -> Option<String> {
    if let Some(message) = &status.message {
        return Some(message.clone());
    }
    if let Some(condition) = unscheduled(status) {
        return Some(match (&condition.reason, &condition.message) {
            (Some(reason), Some(message)) => format!("{reason}: {message}"),
            (reason, message) => reason.clone().or(message.clone())?,
        });
    }
    let containers = status.init_container_statuses.iter().flatten();
    containers
        .chain(status.container_statuses.iter().flatten())
        .find_map(container_message)
}

/// The condition saying the mesh has not placed the pod (yet), if it says so.
pub fn unscheduled(status: &PodStatus) -> Option<&PodCondition> {
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
}

fn container_message(container: &ContainerStatus) -> Option<String> {
    let state = container.state.as_ref()?;
    let message = state
        .waiting
        .as_ref()
        .and_then(|w| w.message.as_ref())
        .or_else(|| state.terminated.as_ref()?.message.as_ref())?;
    Some(format!("{}: {message}", container.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerState, ContainerStateRunning, ContainerStateWaiting, PodCondition,
    };

    fn spec(containers: &[&str], init: &[(&str, bool)]) -> PodSpec {
        PodSpec {
            containers: containers
                .iter()
                .map(|n| Container {
                    name: n.to_string(),
                    ..Container::default()
                })
                .collect(),
            init_containers: Some(
                init.iter()
                    .map(|(n, sidecar)| Container {
                        name: n.to_string(),
                        restart_policy: sidecar.then(|| "Always".to_string()),
                        ..Container::default()
                    })
                    .collect(),
            ),
            ..PodSpec::default()
        }
    }

    fn running(name: &str, ready: bool, restarts: i32) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            ready,
            restart_count: restarts,
            started: Some(true),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }
    }

    fn waiting(name: &str, reason: &str, message: Option<&str>, restarts: i32) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            restart_count: restarts,
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: message.map(str::to_string),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }
    }

    fn terminated(name: &str, exit_code: i32, reason: Option<&str>) -> ContainerStatus {
        ContainerStatus {
            name: name.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    reason: reason.map(str::to_string),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }
    }

    fn condition(type_: &str, status: &str) -> PodCondition {
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            ..PodCondition::default()
        }
    }

    #[test]
    fn a_running_pod_counts_ready_containers_and_restarts() {
        let status = PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![running("a", true, 1), running("b", false, 2)]),
            ..PodStatus::default()
        };
        let shown = pod_display(Some(&spec(&["a", "b"], &[])), &status, false);
        assert_eq!(
            shown,
            PodDisplay {
                status: "Running".into(),
                ready: 1,
                containers: 2,
                restarts: 3,
                message: None,
            }
        );
    }

    #[test]
    fn a_waiting_container_names_the_status_and_its_message_says_why() {
        let status = PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![waiting(
                "app",
                "CrashLoopBackOff",
                Some("back-off 20s restarting failed container"),
                4,
            )]),
            ..PodStatus::default()
        };
        let shown = pod_display(Some(&spec(&["app"], &[])), &status, false);
        assert_eq!(shown.status, "CrashLoopBackOff");
        assert_eq!((shown.ready, shown.restarts), (0, 4));
        assert_eq!(
            shown.message.as_deref(),
            Some("app: back-off 20s restarting failed container")
        );
    }

    #[test]
    fn init_containers_show_progress_then_their_failure() {
        let pod = spec(&["app"], &[("first", false), ("second", false)]);
        let mut status = PodStatus {
            phase: Some("Pending".into()),
            init_container_statuses: Some(vec![
                terminated("first", 0, Some("Completed")),
                running("second", false, 0),
            ]),
            container_statuses: Some(vec![waiting("app", "PodInitializing", None, 0)]),
            ..PodStatus::default()
        };
        assert_eq!(pod_display(Some(&pod), &status, false).status, "Init:1/2");
        status.init_container_statuses = Some(vec![
            terminated("first", 0, Some("Completed")),
            terminated("second", 3, None),
        ]);
        assert_eq!(
            pod_display(Some(&pod), &status, false).status,
            "Init:ExitCode:3"
        );
        status.init_container_statuses = Some(vec![waiting(
            "first",
            "ErrImagePull",
            Some("pull access denied"),
            0,
        )]);
        let shown = pod_display(Some(&pod), &status, false);
        assert_eq!(shown.status, "Init:ErrImagePull");
        assert_eq!(shown.message.as_deref(), Some("first: pull access denied"));
    }

    #[test]
    fn a_started_sidecar_counts_as_a_container_and_does_not_hold_the_pod_in_init() {
        let pod = spec(&["app"], &[("proxy", true)]);
        let status = PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![condition("Initialized", "True")]),
            init_container_statuses: Some(vec![running("proxy", true, 2)]),
            container_statuses: Some(vec![running("app", true, 1)]),
            ..PodStatus::default()
        };
        let shown = pod_display(Some(&pod), &status, false);
        // kubectl counts the sidecar's restarts with the app container's.
        assert_eq!(
            (
                shown.status.as_str(),
                shown.ready,
                shown.containers,
                shown.restarts
            ),
            ("Running", 2, 2, 3)
        );
    }

    #[test]
    fn completed_beside_a_running_container_is_running_or_not_ready() {
        let pod = spec(&["job", "server"], &[]);
        let mut status = PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![
                terminated("job", 0, Some("Completed")),
                running("server", true, 0),
            ]),
            ..PodStatus::default()
        };
        // kubectl walks the containers last to first: the first one's Completed wins.
        assert_eq!(pod_display(Some(&pod), &status, false).status, "NotReady");
        status.conditions = Some(vec![condition("Ready", "True")]);
        assert_eq!(pod_display(Some(&pod), &status, false).status, "Running");
    }

    #[test]
    fn the_pods_own_reason_and_deletion_win() {
        let status = PodStatus {
            phase: Some("Failed".into()),
            reason: Some("AgentLost".into()),
            message: Some("its agent stopped answering".into()),
            ..PodStatus::default()
        };
        let shown = pod_display(Some(&spec(&["app"], &[])), &status, false);
        assert_eq!(shown.status, "AgentLost");
        assert_eq!(
            shown.message.as_deref(),
            Some("its agent stopped answering")
        );
        // A terminal pod being deleted keeps its status; a running one terminates.
        assert_eq!(pod_display(None, &status, true).status, "AgentLost");
        let running_pod = PodStatus {
            phase: Some("Running".into()),
            ..PodStatus::default()
        };
        assert_eq!(pod_display(None, &running_pod, true).status, "Terminating");
    }

    #[test]
    fn an_unschedulable_pod_is_pending_with_the_schedulers_words() {
        let status = PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![PodCondition {
                reason: Some("Unschedulable".into()),
                message: Some("0/2 agents fit: 2 insufficient memory".into()),
                ..condition("PodScheduled", "False")
            }]),
            ..PodStatus::default()
        };
        let shown = pod_display(Some(&spec(&["app"], &[])), &status, false);
        assert_eq!(shown.status, "Pending");
        assert_eq!(
            shown.message.as_deref(),
            Some("Unschedulable: 0/2 agents fit: 2 insufficient memory")
        );
    }
}
