//! What an agent observed of a pod, mapped to a Kubernetes `PodStatus` the way the
//! kubelet maps it (phase rules of the kubelet's `getPhase`, its four conditions and
//! their reasons).

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The state of one container as the supervisor tracks it.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        message: Option<String>,
        started_at: Option<Timestamp>,
        finished_at: Option<Timestamp>,
    },
}

impl Observed {
    pub fn waiting(reason: &str, message: Option<String>) -> Observed {
        Observed::Waiting {
            reason: reason.to_string(),
            message,
        }
    }

    /// The kubelet's reason for a terminated container.
    pub fn exit_reason(exit_code: i32) -> &'static str {
        if exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
    }
}

/// One container's record.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    /// The kubelet's `imageID`, once a container was made; empty before.
    pub image_id: String,
    pub container_id: Option<String>,
    pub state: Observed,
    pub last_state: Option<Observed>,
    pub restart_count: u32,
    pub ready: bool,
    /// Whether the startup probe passed (or there is none) while running.
    pub started: bool,
    /// An init container with `restartPolicy: Always`.
    pub sidecar: bool,
}

impl ContainerView {
    /// A sidecar that the containers after it need not wait for any more: running and
    /// started, or run before (being restarted, or stopped after the app containers).
    pub fn sidecar_up(&self) -> bool {
        match self.state {
            Observed::Running { .. } => self.started,
            Observed::Terminated { .. } => true,
            Observed::Waiting { .. } => self.last_state.is_some(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn from_spec(value: Option<&str>) -> RestartPolicy {
        match value {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        }
    }

    /// Whether a container that exited with `exit_code` is started again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// Everything the status of one pod is computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct PodView {
    pub init: Vec<ContainerView>,
    pub app: Vec<ContainerView>,
    /// Added to debug the pod: shown, never part of its phase or readiness.
    pub ephemeral: Vec<ContainerView>,
    pub restart_policy: RestartPolicy,
    pub pod_ip: Option<String>,
    pub host_ip: Option<String>,
    pub start_time: Option<Timestamp>,
    /// A failure of the whole pod (e.g. its spec cannot run): phase Failed.
    pub failure: Option<(String, String)>,
    /// For a pod of a stateful workload: how its member stands in the group.
    pub group: Option<crate::raft::Standing>,
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn to_state(o: &Observed) -> ContainerState {
    match o {
        Observed::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        Observed::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(time(*started_at)),
            }),
            ..Default::default()
        },
        Observed::Terminated {
            exit_code,
            reason,
            message,
            started_at,
            finished_at,
        } => ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: *exit_code,
                reason: Some(reason.clone()),
                message: message.clone(),
                started_at: started_at.map(time),
                finished_at: finished_at.map(time),
                ..Default::default()
            }),
            ..Default::default()
        },
    }
}

fn to_status(c: &ContainerView) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        container_id: c.container_id.as_ref().map(|id| format!("podman://{id}")),
        ready: c.ready,
        restart_count: i32::try_from(c.restart_count).unwrap_or(i32::MAX),
        started: Some(matches!(c.state, Observed::Running { .. }) && c.started),
        state: Some(to_state(&c.state)),
        last_state: Some(c.last_state.as_ref().map(to_state).unwrap_or_default()),
        ..Default::default()
    }
}

fn succeeded(o: &Observed) -> bool {
    matches!(o, Observed::Terminated { exit_code: 0, .. })
}

/// The kubelet's phase rules.
/// Sidecars count as running while they run; how they end never decides the phase.
pub fn phase(view: &PodView) -> &'static str {
    if view.failure.is_some() {
        return "Failed";
    }
    let (sidecars, regular): (Vec<&ContainerView>, Vec<&ContainerView>) =
        view.init.iter().partition(|c| c.sidecar);
    let init_pending =
        regular.iter().any(|c| !succeeded(&c.state)) || sidecars.iter().any(|c| !c.sidecar_up());
    let init_failed = regular
        .iter()
        .any(|c| matches!(c.state, Observed::Terminated { exit_code, .. } if exit_code != 0));
    if init_failed && view.restart_policy == RestartPolicy::Never {
        return "Failed";
    }
    if init_pending {
        return "Pending";
    }
    let (mut waiting, mut stopped, mut ok) = (0, 0, 0);
    let mut running = sidecars
        .iter()
        .filter(|c| matches!(c.state, Observed::Running { .. }))
        .count();
    for c in &view.app {
        match &c.state {
            Observed::Running { .. } => running += 1,
            Observed::Terminated { exit_code, .. } => {
                stopped += 1;
                if *exit_code == 0 {
                    ok += 1;
                }
            }
            // A container waiting to be restarted has run before: it counts as stopped.
            Observed::Waiting { .. } if c.last_state.is_some() => stopped += 1,
            Observed::Waiting { .. } => waiting += 1,
        }
    }
    if waiting > 0 || view.app.is_empty() {
        "Pending"
    } else if running > 0 || view.restart_policy == RestartPolicy::Always {
        // Nothing runs under Always: everything is restarting.
        "Running"
    } else if stopped == ok {
        "Succeeded"
    } else if view.restart_policy == RestartPolicy::Never {
        "Failed"
    } else {
        "Running"
    }
}

fn condition(
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    message: Option<String>,
    now: Timestamp,
) -> PodCondition {
    PodCondition {
        type_: kind.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: if ok { None } else { reason.map(str::to_string) },
        message: if ok { None } else { message },
        last_transition_time: Some(time(now)),
        ..Default::default()
    }
}

/// The pod's status. `now` stamps the conditions' transition times; callers keep the
/// previous time when a condition did not change (see [`carry_transition_times`]).
pub fn pod_status(view: &PodView, now: Timestamp) -> PodStatus {
    let phase = phase(view);
    let terminal = phase == "Succeeded" || phase == "Failed";
    let incomplete: Vec<&str> = view
        .init
        .iter()
        .filter(|c| {
            if c.sidecar {
                !c.sidecar_up()
            } else {
                !succeeded(&c.state)
            }
        })
        .map(|c| c.name.as_str())
        .collect();
    // A sidecar's readiness counts as an app container's.
    let unready: Vec<&str> = view
        .init
        .iter()
        .filter(|c| c.sidecar)
        .chain(&view.app)
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let initialized = incomplete.is_empty();
    let ready = initialized && unready.is_empty() && !terminal;
    let (ready_reason, ready_message) = if terminal {
        ("PodCompleted", None)
    } else if !initialized {
        (
            "ContainersNotInitialized",
            Some(format!(
                "containers with incomplete status: [{}]",
                incomplete.join(" ")
            )),
        )
    } else {
        (
            "ContainersNotReady",
            Some(format!(
                "containers with unready status: [{}]",
                unready.join(" ")
            )),
        )
    };
    let mut conditions = vec![
        condition(
            "Initialized",
            initialized,
            Some(if terminal {
                "PodCompleted"
            } else {
                "ContainersNotInitialized"
            }),
            (!initialized).then(|| {
                format!(
                    "containers with incomplete status: [{}]",
                    incomplete.join(" ")
                )
            }),
            now,
        ),
        condition(
            "Ready",
            ready,
            Some(ready_reason),
            ready_message.clone(),
            now,
        ),
        condition(
            "ContainersReady",
            ready,
            Some(ready_reason),
            ready_message,
            now,
        ),
        condition("PodScheduled", true, None, None, now),
    ];
    // An evicted pod says who ended it, as the kubelet's eviction manager writes it.
    if let Some((_, message)) = view.failure.as_ref().filter(|(r, _)| r == "Evicted") {
        conditions.push(PodCondition {
            type_: "DisruptionTarget".into(),
            status: "True".into(),
            reason: Some("TerminationByKubelet".into()),
            message: Some(message.clone()),
            last_transition_time: Some(time(now)),
            ..Default::default()
        });
    }
    // Unlike the kubelet's own conditions, this one keeps its reason when True: the
    // member's role, which the node makes a label.
    if let Some(group) = &view.group {
        conditions.push(PodCondition {
            type_: crate::raft::GROUP_READY_CONDITION.into(),
            status: if group.ready { "True" } else { "False" }.into(),
            reason: Some(group.reason.into()),
            message: Some(group.message.clone()),
            last_transition_time: Some(time(now)),
            ..Default::default()
        });
    }
    let (reason, message) = match &view.failure {
        Some((r, m)) => (Some(r.clone()), Some(m.clone())),
        None => (None, None),
    };
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        reason,
        message,
        host_ip: view.host_ip.clone(),
        host_ips: view.host_ip.clone().map(|ip| vec![HostIP { ip }]),
        pod_ip: view.pod_ip.clone(),
        pod_ips: view.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
        start_time: view.start_time.map(time),
        init_container_statuses: (!view.init.is_empty())
            .then(|| view.init.iter().map(to_status).collect()),
        container_statuses: Some(view.app.iter().map(to_status).collect()),
        ephemeral_container_statuses: (!view.ephemeral.is_empty())
            .then(|| view.ephemeral.iter().map(to_status).collect()),
        qos_class: None,
        ..Default::default()
    }
}

/// Keeps each condition's previous transition time when its status did not change,
/// so that reports differ only when something really changed.
pub fn carry_transition_times(new: &mut PodStatus, old: &PodStatus) {
    let (Some(new_conds), Some(old_conds)) = (new.conditions.as_mut(), old.conditions.as_ref())
    else {
        return;
    };
    for c in new_conds.iter_mut() {
        if let Some(o) = old_conds
            .iter()
            .find(|o| o.type_ == c.type_ && o.status == c.status)
        {
            c.last_transition_time = o.last_transition_time.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, state: Observed) -> ContainerView {
        ContainerView {
            name: name.into(),
            image: "img".into(),
            image_id: String::new(),
            container_id: None,
            state,
            last_state: None,
            restart_count: 0,
            ready: false,
            started: true,
            sidecar: false,
        }
    }

    fn running() -> Observed {
        Observed::Running {
            started_at: Timestamp::now(),
        }
    }

    fn exited(code: i32) -> Observed {
        Observed::Terminated {
            exit_code: code,
            reason: Observed::exit_reason(code).into(),
            message: None,
            started_at: None,
            finished_at: None,
        }
    }

    fn view(init: Vec<ContainerView>, app: Vec<ContainerView>, policy: RestartPolicy) -> PodView {
        PodView {
            init,
            app,
            ephemeral: Vec::new(),
            restart_policy: policy,
            pod_ip: Some("10.88.0.5".into()),
            host_ip: Some("127.0.0.1".into()),
            start_time: Some(Timestamp::now()),
            failure: None,
            group: None,
        }
    }

    #[test]
    fn phases_follow_the_kubelet() {
        use RestartPolicy::*;
        let waiting = || Observed::waiting("ContainerCreating", None);
        assert_eq!(
            phase(&view(
                vec![c("i", running())],
                vec![c("a", waiting())],
                Always
            )),
            "Pending"
        );
        assert_eq!(
            phase(&view(
                vec![c("i", exited(1))],
                vec![c("a", waiting())],
                Never
            )),
            "Failed"
        );
        assert_eq!(
            phase(&view(
                vec![c("i", exited(1))],
                vec![c("a", waiting())],
                Always
            )),
            "Pending"
        );
        assert_eq!(
            phase(&view(
                vec![c("i", exited(0))],
                vec![c("a", running())],
                Always
            )),
            "Running"
        );
        assert_eq!(
            phase(&view(
                vec![],
                vec![c("a", exited(0)), c("b", exited(0))],
                Never
            )),
            "Succeeded"
        );
        assert_eq!(
            phase(&view(
                vec![],
                vec![c("a", exited(0)), c("b", exited(2))],
                Never
            )),
            "Failed"
        );
        assert_eq!(
            phase(&view(vec![], vec![c("a", exited(2))], OnFailure)),
            "Running"
        );
        assert_eq!(
            phase(&view(vec![], vec![c("a", exited(0))], Always)),
            "Running"
        );
        let mut backing_off = c("a", Observed::waiting("CrashLoopBackOff", None));
        backing_off.last_state = Some(exited(1));
        assert_eq!(
            phase(&view(vec![], vec![backing_off, c("b", running())], Always)),
            "Running"
        );
        let mut failed = view(vec![], vec![c("a", running())], Always);
        failed.failure = Some(("AgentLost".into(), "gone".into()));
        assert_eq!(phase(&failed), "Failed");
    }

    fn sidecar(state: Observed) -> ContainerView {
        ContainerView {
            sidecar: true,
            ..c("proxy", state)
        }
    }

    #[test]
    fn sidecars_count_while_they_run_and_never_decide_how_the_pod_ended() {
        use RestartPolicy::*;
        let waiting = || Observed::waiting("PodInitializing", None);
        // Not started yet (its startup probe pending): the pod is still initializing.
        let mut starting = sidecar(running());
        starting.started = false;
        let pending = view(vec![starting], vec![c("a", waiting())], Never);
        assert_eq!(phase(&pending), "Pending");
        let status = pod_status(&pending, Timestamp::now());
        let initialized = &status.conditions.as_ref().expect("conditions")[0];
        assert_eq!(
            (initialized.status.as_str(), initialized.message.as_deref()),
            ("False", Some("containers with incomplete status: [proxy]"))
        );
        // Started: the app containers run, and the sidecar's readiness counts.
        let v = view(vec![sidecar(running())], vec![c("a", running())], Never);
        assert_eq!(phase(&v), "Running");
        let status = pod_status(&v, Timestamp::now());
        let ready = &status.conditions.as_ref().expect("conditions")[1];
        assert_eq!(
            ready.message.as_deref(),
            Some("containers with unready status: [proxy a]")
        );
        // The app container is done, the sidecar still runs: Running until it stops.
        let v = view(vec![sidecar(running())], vec![c("a", exited(0))], Never);
        assert_eq!(phase(&v), "Running");
        // Stopped by SIGTERM after the app container succeeded: Succeeded all the same.
        let v = view(vec![sidecar(exited(143))], vec![c("a", exited(0))], Never);
        assert_eq!(phase(&v), "Succeeded");
        let v = view(vec![sidecar(exited(143))], vec![c("a", exited(1))], Never);
        assert_eq!(phase(&v), "Failed");
        // A sidecar being restarted holds nothing back.
        let mut restarting = sidecar(Observed::waiting("CrashLoopBackOff", None));
        restarting.last_state = Some(exited(1));
        assert_eq!(
            phase(&view(vec![restarting], vec![c("a", running())], Always)),
            "Running"
        );
    }

    #[test]
    fn conditions_name_the_containers_holding_the_pod_back() {
        let mut ready = c("web", running());
        ready.ready = true;
        let v = view(
            vec![],
            vec![ready, c("side", running())],
            RestartPolicy::Always,
        );
        let status = pod_status(&v, Timestamp::now());
        let conds = status.conditions.expect("conditions");
        let get = |t: &str| conds.iter().find(|c| c.type_ == t).expect(t).clone();
        assert_eq!(get("Initialized").status, "True");
        assert_eq!(get("PodScheduled").status, "True");
        assert_eq!(get("Ready").status, "False");
        assert_eq!(
            get("ContainersReady").reason.as_deref(),
            Some("ContainersNotReady")
        );
        assert_eq!(
            get("Ready").message.as_deref(),
            Some("containers with unready status: [side]")
        );
        assert_eq!(status.pod_ip.as_deref(), Some("10.88.0.5"));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.init_container_statuses.is_none());
    }

    #[test]
    fn container_statuses_carry_state_restarts_and_last_state() {
        let mut a = c(
            "a",
            Observed::waiting("CrashLoopBackOff", Some("back-off 10s".into())),
        );
        a.restart_count = 2;
        a.last_state = Some(exited(3));
        a.container_id = Some("abc".into());
        let status = pod_status(
            &view(vec![], vec![a], RestartPolicy::Always),
            Timestamp::now(),
        );
        let cs = &status.container_statuses.expect("statuses")[0];
        assert_eq!(cs.restart_count, 2);
        assert_eq!(cs.container_id.as_deref(), Some("podman://abc"));
        let waiting = cs
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .expect("waiting");
        assert_eq!(waiting.reason.as_deref(), Some("CrashLoopBackOff"));
        let last = cs
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("terminated");
        assert_eq!(last.exit_code, 3);
        assert_eq!(last.reason.as_deref(), Some("Error"));
    }

    #[test]
    fn transition_times_are_kept_for_unchanged_conditions() {
        let v = view(vec![], vec![c("a", running())], RestartPolicy::Always);
        let then = Timestamp::from_second(1_700_000_000).expect("valid");
        let old = pod_status(&v, then);
        let mut new = pod_status(&v, Timestamp::now());
        carry_transition_times(&mut new, &old);
        assert_eq!(new, old);
    }
}
