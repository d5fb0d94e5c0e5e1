//! Kubernetes Events for a pod's main transitions, as the kubelet records them
//! (Scheduled on the mesh, Pulled/Created/Started, Killing, failures).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ContainerStatus, Event, EventSource, ObjectReference, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use libp2p::PeerId;
use serde_json::json;
use tokio::sync::mpsc;

use crate::wire::PodRef;

pub const COMPONENT: &str = "beemesh";

/// How a waiting container's message starts when its pod's volumes could not be set
/// up (the kubelet's FailedMount event), or its sandbox not made (FailedCreatePodSandBox).
pub const MOUNT_FAILED: &str = "MountVolume.SetUp failed";
pub const SANDBOX_FAILED: &str = "Failed to create pod sandbox";

/// One event about a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

impl PodEvent {
    pub fn normal(reason: &'static str, message: String) -> PodEvent {
        PodEvent {
            warning: false,
            reason,
            message,
        }
    }

    pub fn warning(reason: &'static str, message: String) -> PodEvent {
        PodEvent {
            warning: true,
            reason,
            message,
        }
    }
}

/// What happened between two statuses of a pod (`old` None: first seen).
pub fn transition_events(
    pod: &PodRef,
    old: Option<(&PodStatus, Option<PeerId>)>,
    new: &PodStatus,
    agent: Option<PeerId>,
) -> Vec<PodEvent> {
    let mut events = Vec::new();
    let old_agent = old.and_then(|(_, agent)| agent);
    if let Some(agent) = agent.filter(|a| Some(*a) != old_agent) {
        events.push(PodEvent::normal(
            "Scheduled",
            format!("Successfully assigned {pod} to agent {agent} on the mesh"),
        ));
    }
    let old_status = old.map(|(status, _)| status);
    if new.reason != old_status.and_then(|s| s.reason.clone()) {
        if let Some(reason) = &new.reason {
            let message = new.message.clone().unwrap_or_default();
            events.push(match reason.as_str() {
                "AgentLost" => PodEvent::warning("AgentLost", message),
                "UnsupportedPodSpec" => PodEvent::warning("Failed", format!("Error: {message}")),
                // The kubelet's admission refusals are their own events.
                "OutOfcpu" => PodEvent::warning("OutOfcpu", message),
                "OutOfmemory" => PodEvent::warning("OutOfmemory", message),
                "DeadlineExceeded" => PodEvent::normal("DeadlineExceeded", message),
                "Evicted" => PodEvent::warning("Evicted", message),
                _ => PodEvent::warning("Failed", message),
            });
        }
    }
    let unschedulable = |status: &PodStatus| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })
            .and_then(|c| c.message.clone())
    };
    if let Some(message) = unschedulable(new) {
        if old_status.and_then(unschedulable).as_ref() != Some(&message) {
            events.push(PodEvent::warning("FailedScheduling", message));
        }
    }
    if let Some(message) = setup_problem(new) {
        if old_status.and_then(setup_problem).as_ref() != Some(&message) {
            let reason = if message.starts_with(MOUNT_FAILED) {
                "FailedMount"
            } else {
                "FailedCreatePodSandBox"
            };
            events.push(PodEvent::warning(reason, message));
        }
    }
    let containers = |status: Option<&PodStatus>| -> Vec<ContainerStatus> {
        status
            .map(|s| {
                s.init_container_statuses
                    .iter()
                    .flatten()
                    .chain(s.container_statuses.iter().flatten())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = containers(old_status);
    for container in containers(Some(new)) {
        let previous = before.iter().find(|c| c.name == container.name);
        container_events(pod, previous, &container, &mut events);
    }
    events
}

/// The pod's volumes or sandbox could not be set up: the message its containers wait
/// with (the same on each, so told once per pod as the kubelet does).
fn setup_problem(status: &PodStatus) -> Option<String> {
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.message.clone())
        .find(|m| m.starts_with(MOUNT_FAILED) || m.starts_with(SANDBOX_FAILED))
}

fn container_events(
    pod: &PodRef,
    old: Option<&ContainerStatus>,
    new: &ContainerStatus,
    events: &mut Vec<PodEvent>,
) {
    let name = &new.name;
    let new_instance = new
        .container_id
        .as_ref()
        .is_some_and(|id| Some(id) != old.and_then(|o| o.container_id.as_ref()));
    if new_instance {
        events.push(PodEvent::normal(
            "Pulled",
            format!("Container image \"{}\" present on the agent", new.image),
        ));
        events.push(PodEvent::normal(
            "Created",
            format!("Created container {name}"),
        ));
        events.push(PodEvent::normal(
            "Started",
            format!("Started container {name}"),
        ));
    }
    let waiting = |status: &ContainerStatus| {
        status
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| Some((w.reason.clone()?, w.message.clone().unwrap_or_default())))
    };
    let Some((reason, message)) = waiting(new) else {
        return;
    };
    if old.and_then(waiting).map(|(r, _)| r) == Some(reason.clone()) {
        return;
    }
    let image = &new.image;
    let event = match reason.as_str() {
        // The agent's waiting message is already the kubelet's event message.
        "ErrImagePull" => PodEvent::warning("Failed", message),
        "ErrImageNeverPull" => PodEvent::warning("ErrImageNeverPull", message),
        "ImagePullBackOff" => {
            PodEvent::normal("BackOff", format!("Back-off pulling image \"{image}\""))
        }
        "CrashLoopBackOff" => PodEvent::warning(
            "BackOff",
            format!("Back-off restarting failed container {name} in pod {pod}"),
        ),
        "CreateContainerConfigError"
        | "CreateContainerError"
        | "RunContainerError"
        | "StartError" => PodEvent::warning("Failed", format!("Error: {message}")),
        _ => return,
    };
    events.push(event);
}

/// How many distinct events the recorder remembers for counting repeats (client-go's
/// `maxLruCacheEntries`).
const CORRELATOR_ENTRIES: usize = 4096;
/// Events waiting for the writer; more are dropped (the API server is not keeping up).
const QUEUE: usize = 1024;

/// Identical events (same pod, type, reason and message) are one Event whose count
/// grows, as client-go's event logger makes them: what `kubectl describe` shows as
/// `(x4 over 2m)`. Pure; remembers the latest [`CORRELATOR_ENTRIES`].
#[derive(Default)]
struct Correlator {
    seen: HashMap<CorrelationKey, Seen>,
    /// Keys by last use, oldest first.
    by_use: BTreeMap<u64, CorrelationKey>,
    tick: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CorrelationKey {
    uid: String,
    warning: bool,
    reason: &'static str,
    message: String,
}

struct Seen {
    name: String,
    count: i32,
    first: Timestamp,
    used: u64,
}

/// What to write for an event.
#[derive(Debug, PartialEq, Eq)]
enum Write {
    Create {
        name: String,
    },
    /// A repeat: the existing Event's count and last time.
    Count {
        name: String,
        count: i32,
        first: Timestamp,
    },
}

impl Correlator {
    fn observe(&mut self, key: CorrelationKey, name: String, now: Timestamp) -> Write {
        self.tick += 1;
        let tick = self.tick;
        if let Some(seen) = self.seen.get_mut(&key) {
            self.by_use.remove(&seen.used);
            self.by_use.insert(tick, key);
            seen.used = tick;
            seen.count = seen.count.saturating_add(1);
            return Write::Count {
                name: seen.name.clone(),
                count: seen.count,
                first: seen.first,
            };
        }
        if self.seen.len() >= CORRELATOR_ENTRIES {
            if let Some((_, oldest)) = self.by_use.pop_first() {
                self.seen.remove(&oldest);
            }
        }
        self.by_use.insert(tick, key.clone());
        self.seen.insert(
            key,
            Seen {
                name: name.clone(),
                count: 1,
                first: now,
                used: tick,
            },
        );
        Write::Create { name }
    }

    /// The Event is gone from the API (expired): the next repeat creates it anew.
    fn forget(&mut self, key: &CorrelationKey) {
        if let Some(seen) = self.seen.remove(key) {
            self.by_use.remove(&seen.used);
        }
    }
}

/// Writes events to the API (core/v1, as the kubelet does, so that `kubectl describe`
/// shows them), one at a time in order, repeats counted on their first Event.
#[derive(Clone)]
pub struct EventRecorder {
    queue: mpsc::Sender<(Involved, PodEvent)>,
}

/// The object an event is about: a pod, or a Service (the gateway's events).
#[derive(Debug, Clone)]
struct Involved {
    kind: &'static str,
    object: PodRef,
}

impl EventRecorder {
    /// Starts the writer; it ends when every recorder is dropped.
    pub fn new(client: Client, node_name: String) -> EventRecorder {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(client, node_name, pending));
        EventRecorder { queue }
    }

    /// Queues the events; a full queue drops them (logged), and a failed write is
    /// logged, never retried.
    pub fn record(&self, pod: &PodRef, events: Vec<PodEvent>) {
        self.record_about("Pod", pod, events);
    }

    /// As [`Self::record`], about an object of another kind (`Service`).
    pub fn record_about(&self, kind: &'static str, object: &PodRef, events: Vec<PodEvent>) {
        for event in events {
            let involved = Involved {
                kind,
                object: object.clone(),
            };
            if self.queue.try_send((involved, event)).is_err() {
                tracing::debug!(%object, kind, "event dropped: the writer is behind");
            }
        }
    }
}

async fn write_events(
    client: Client,
    node: String,
    mut pending: mpsc::Receiver<(Involved, PodEvent)>,
) {
    let mut correlator = Correlator::default();
    while let Some((involved, event)) = pending.recv().await {
        let pod = &involved.object;
        let api: Api<Event> = Api::namespaced(client.clone(), &pod.namespace);
        let now = Timestamp::now();
        let key = CorrelationKey {
            uid: pod.uid.0.clone(),
            warning: event.warning,
            reason: event.reason,
            message: event.message.clone(),
        };
        let name = format!("{}.{:x}", pod.name, now.as_nanosecond());
        let written = match correlator.observe(key.clone(), name, now) {
            Write::Create { name } => api
                .create(
                    &PostParams::default(),
                    &new_event(&involved, &node, &event, name, now),
                )
                .await
                .map(drop),
            Write::Count { name, count, first } => {
                let patch =
                    json!({"count": count, "lastTimestamp": Time(now), "message": event.message});
                match api
                    .patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                {
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        correlator.forget(&key);
                        let mut record = new_event(&involved, &node, &event, name, now);
                        record.first_timestamp = Some(Time(first));
                        record.count = Some(count);
                        api.create(&PostParams::default(), &record).await.map(drop)
                    }
                    other => other.map(drop),
                }
            }
        };
        if let Err(e) = written {
            tracing::debug!(%pod, reason = event.reason, error = %e, "event not recorded");
        }
    }
}

fn new_event(
    involved: &Involved,
    node: &str,
    event: &PodEvent,
    name: String,
    now: Timestamp,
) -> Event {
    let pod = &involved.object;
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(pod.namespace.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some(involved.kind.into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.0.clone()),
            ..Default::default()
        },
        reason: Some(event.reason.into()),
        message: Some(event.message.clone()),
        type_: Some(if event.warning { "Warning" } else { "Normal" }.into()),
        source: Some(EventSource {
            component: Some(COMPONENT.into()),
            host: Some(node.to_string()),
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        reporting_component: Some(COMPONENT.into()),
        reporting_instance: Some(node.to_string()),
        action: Some(event.reason.into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PodUid;
    use serde_json::json;

    fn pod() -> PodRef {
        PodRef {
            uid: PodUid("u".into()),
            namespace: "default".into(),
            name: "web".into(),
        }
    }

    fn status(value: serde_json::Value) -> PodStatus {
        serde_json::from_value(value).expect("status")
    }

    fn reasons(events: &[PodEvent]) -> Vec<&str> {
        events.iter().map(|e| e.reason).collect()
    }

    fn key(uid: &str, message: &str) -> CorrelationKey {
        CorrelationKey {
            uid: uid.into(),
            warning: true,
            reason: "Unhealthy",
            message: message.into(),
        }
    }

    #[test]
    fn identical_events_count_on_their_first_event_and_others_are_new() {
        let mut correlator = Correlator::default();
        let t0 = Timestamp::from_second(1_000).expect("time");
        let t1 = Timestamp::from_second(1_060).expect("time");
        let failed = key("u", "Liveness probe failed: 503");
        assert_eq!(
            correlator.observe(failed.clone(), "web.1".into(), t0),
            Write::Create {
                name: "web.1".into()
            }
        );
        assert_eq!(
            correlator.observe(failed.clone(), "web.2".into(), t1),
            Write::Count {
                name: "web.1".into(),
                count: 2,
                first: t0
            }
        );
        // Another message, or another pod: an event of its own.
        assert_eq!(
            correlator.observe(key("u", "Liveness probe failed: 500"), "web.3".into(), t1),
            Write::Create {
                name: "web.3".into()
            }
        );
        assert_eq!(
            correlator.observe(key("v", "Liveness probe failed: 503"), "db.1".into(), t1),
            Write::Create {
                name: "db.1".into()
            }
        );
        // An Event that expired from the API starts over.
        correlator.forget(&failed);
        assert_eq!(
            correlator.observe(failed, "web.4".into(), t1),
            Write::Create {
                name: "web.4".into()
            }
        );
    }

    #[test]
    fn the_correlator_forgets_the_least_recently_seen_beyond_its_size() {
        let mut correlator = Correlator::default();
        let now = Timestamp::from_second(1_000).expect("time");
        for i in 0..CORRELATOR_ENTRIES {
            correlator.observe(key(&i.to_string(), "m"), format!("p.{i}"), now);
        }
        // The first is seen again, so the second is the oldest when room is needed.
        correlator.observe(key("0", "m"), "again".into(), now);
        correlator.observe(key("new", "m"), "new".into(), now);
        assert_eq!(correlator.seen.len(), CORRELATOR_ENTRIES);
        assert!(correlator.seen.contains_key(&key("0", "m")));
        assert!(!correlator.seen.contains_key(&key("1", "m")));
        assert_eq!(correlator.by_use.len(), CORRELATOR_ENTRIES);
    }

    #[test]
    fn placement_and_a_started_container_give_the_kubelets_events() {
        let agent = PeerId::random();
        let pending = status(json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 agents fit: 1 insufficient memory"}]}));
        let first = transition_events(&pod(), None, &pending, None);
        assert_eq!(reasons(&first), ["FailedScheduling"]);
        assert!(first[0].warning && first[0].message.contains("insufficient memory"));
        // The same reason again records nothing.
        assert!(transition_events(&pod(), Some((&pending, None)), &pending, None).is_empty());

        let running = status(json!({"phase": "Running", "containerStatuses": [{
            "name": "c", "image": "busybox", "imageID": "", "ready": true, "restartCount": 0,
            "containerID": "podman://abc", "state": {"running": {}}}]}));
        let events = transition_events(&pod(), Some((&pending, None)), &running, Some(agent));
        assert_eq!(
            reasons(&events),
            ["Scheduled", "Pulled", "Created", "Started"]
        );
        assert!(events[0].message.contains(&agent.to_string()));
        assert!(
            transition_events(&pod(), Some((&running, Some(agent))), &running, Some(agent))
                .is_empty()
        );
    }

    #[test]
    fn a_setup_problem_is_one_event_per_pod_and_message() {
        let waiting = |message: &str| {
            let container = |name: &str| {
                json!({"name": name, "image": "busybox", "imageID": "", "ready": false,
                    "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating", "message": message}}})
            };
            status(
                json!({"phase": "Pending", "containerStatuses": [container("a"), container("b")]}),
            )
        };
        let full =
            waiting("MountVolume.SetUp failed for volume \"scratch\" : No space left on device");
        let events = transition_events(&pod(), None, &full, None);
        assert_eq!(
            events,
            [PodEvent::warning(
                "FailedMount",
                "MountVolume.SetUp failed for volume \"scratch\" : No space left on device".into()
            )]
        );
        assert!(transition_events(&pod(), Some((&full, None)), &full, None).is_empty());
        let sandbox = waiting("Failed to create pod sandbox: name in use");
        assert_eq!(
            reasons(&transition_events(
                &pod(),
                Some((&full, None)),
                &sandbox,
                None
            )),
            ["FailedCreatePodSandBox"]
        );
    }

    #[test]
    fn failures_are_warnings_once_per_reason() {
        let crash = status(json!({"phase": "Running", "containerStatuses": [{
            "name": "c", "image": "busybox", "imageID": "", "ready": false, "restartCount": 2,
            "containerID": "podman://abc",
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}}}]}));
        let events = transition_events(&pod(), None, &crash, None);
        let backoff = events
            .iter()
            .find(|e| e.reason == "BackOff")
            .expect("backoff");
        assert!(backoff.warning);
        assert_eq!(
            backoff.message,
            "Back-off restarting failed container c in pod default/web"
        );
        let config = status(json!({"phase": "Pending", "containerStatuses": [{
            "name": "c", "image": "busybox", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "CreateContainerConfigError", "message": "configmap \"cfg\" not found"}}}]}));
        let events = transition_events(&pod(), None, &config, None);
        assert_eq!(
            events,
            [PodEvent::warning(
                "Failed",
                "Error: configmap \"cfg\" not found".into()
            )]
        );
        let lost = status(
            json!({"phase": "Failed", "reason": "AgentLost", "message": "agent x stopped sending heartbeats"}),
        );
        assert_eq!(
            reasons(&transition_events(
                &pod(),
                Some((&config, None)),
                &lost,
                None
            )),
            ["AgentLost"]
        );
    }
}
