//! Pod status to the API: the owner's status changes are coalesced on a board and
//! written by one task as patches of the pods/status subresource; unchanged status is
//! not sent again. A pod the owner has removed from the mesh is deleted from the API
//! with grace 0, as the kubelet finishes a graceful deletion.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::Client;
use libp2p::PeerId;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::events::{transition_events, EventRecorder, PodEvent};
use crate::node::owner::{was_placed, StatusSink};
use crate::raft::{GROUP_READY_CONDITION, GROUP_ROLE_LABEL};
use crate::retry::Backoff;
use crate::wire::{AgentEvent, PodRef, PodUid};

/// How long the writer waits after a change for more, so that a burst of reports
/// becomes one patch per pod.
const COALESCE: Duration = Duration::from_millis(100);
/// A pod's failed write is tried again after this, doubling up to the maximum while it
/// keeps failing (an API server down or overloaded is not hammered); other pods' writes
/// go on meanwhile.
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Status fields the node owns: each is sent, as null when unset, so that the patch also
/// clears what no longer holds (a reason after recovery, an old pod IP). Not
/// `conditions`: the patch is a strategic merge, as the kubelet's, in which conditions
/// merge by type, so those that others set (readiness gates' conditions, the API
/// server's DisruptionTarget) stay; a null would delete them all.
const OWNED_FIELDS: [&str; 11] = [
    "phase",
    "containerStatuses",
    "initContainerStatuses",
    "ephemeralContainerStatuses",
    "podIP",
    "podIPs",
    "hostIP",
    "hostIPs",
    "startTime",
    "reason",
    "message",
];

#[derive(Debug, Clone)]
enum Update {
    Status {
        pod: PodRef,
        status: Box<PodStatus>,
        agent: Option<PeerId>,
    },
    Removed {
        pod: PodRef,
    },
}

/// Agents' events waiting to be recorded, at most this many reports' worth (more are
/// dropped: the API server is not keeping up).
const MAX_PENDING_EVENTS: usize = 1024;

/// A pod's readiness gates and the API's current status of their conditions, which
/// others (a load balancer controller) set.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Gates {
    /// The gates' condition types, in the spec's order.
    types: Vec<String>,
    /// Condition type to status, for the gates' types the API has.
    current: BTreeMap<String, String>,
}

impl Gates {
    pub fn of(pod: &Pod) -> Gates {
        let types: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.readiness_gates.iter().flatten())
            .map(|gate| gate.condition_type.clone())
            .collect();
        let current = pod
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .filter(|c| types.contains(&c.type_))
            .map(|c| (c.type_.clone(), c.status.clone()))
            .collect();
        Gates { types, current }
    }

    /// The kubelet's message for each gate not True (`GeneratePodReadyCondition`).
    fn unmet(&self) -> Vec<String> {
        self.types
            .iter()
            .filter_map(|gate| match self.current.get(gate) {
                None => Some(format!(
                    "corresponding condition of pod readiness gate {gate:?} does not exist."
                )),
                Some(status) if status != "True" => Some(format!(
                    "the status of pod readiness gate {gate:?} is not \"True\", but {status}"
                )),
                Some(_) => None,
            })
            .collect()
    }
}

/// The latest update per pod, waiting to be written.
#[derive(Default)]
pub struct StatusBoard {
    /// Pods with readiness gates, as the API last showed them.
    gates: Mutex<HashMap<PodUid, Gates>>,
    /// Pods whose gates changed since their status was last written.
    regated: Mutex<HashSet<PodUid>>,
    pending: Mutex<BTreeMap<PodUid, Update>>,
    /// Agents' events, in order: unlike status, every one counts.
    events: Mutex<VecDeque<(PodRef, Vec<PodEvent>)>>,
    notify: Notify,
    /// UIDs of the API's pods bound to this node: only those are written.
    known: Mutex<HashSet<PodUid>>,
    /// Each known pod's status as the API had it when this node first saw the pod:
    /// after a restart, what the node shows until its agent reports, and what events
    /// are told from (so none is recorded twice).
    inherited: Mutex<HashMap<PodUid, PodStatus>>,
}

impl StatusBoard {
    fn post(&self, uid: PodUid, update: Update) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(uid, update);
        }
        self.notify.notify_one();
    }

    fn post_events(&self, pod: &PodRef, events: Vec<PodEvent>) {
        if let Ok(mut pending) = self.events.lock() {
            if pending.len() >= MAX_PENDING_EVENTS {
                tracing::debug!(%pod, "agent events dropped: too many waiting");
                return;
            }
            pending.push_back((pod.clone(), events));
        }
        self.notify.notify_one();
    }

    fn take_events(&self) -> VecDeque<(PodRef, Vec<PodEvent>)> {
        self.events
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    /// The pod's readiness gates as the API now has them (the pod source tells each
    /// version of the pod); a change has its status written again.
    pub fn set_gates(&self, uid: PodUid, gates: Gates) {
        let Ok(mut all) = self.gates.lock() else {
            return;
        };
        let changed = if gates.types.is_empty() {
            all.remove(&uid).is_some()
        } else {
            all.insert(uid.clone(), gates.clone()) != Some(gates)
        };
        drop(all);
        if changed {
            if let Ok(mut regated) = self.regated.lock() {
                regated.insert(uid);
            }
            self.notify.notify_one();
        }
    }

    fn gates(&self, uid: &PodUid) -> Gates {
        self.gates
            .lock()
            .ok()
            .and_then(|all| all.get(uid).cloned())
            .unwrap_or_default()
    }

    fn take_regated(&self) -> HashSet<PodUid> {
        self.regated
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    fn take(&self) -> BTreeMap<PodUid, Update> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Puts back an update that could not be written, unless a newer one came.
    fn retry(&self, uid: PodUid, update: Update) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.entry(uid).or_insert(update);
        }
    }

    /// Sets whether a pod belongs to the API (the pod source tells each change).
    pub fn set_known(&self, uid: PodUid, known: bool) {
        if let Ok(mut set) = self.known.lock() {
            if known {
                set.insert(uid);
            } else {
                if let Ok(mut inherited) = self.inherited.lock() {
                    inherited.remove(&uid);
                }
                if let Ok(mut gates) = self.gates.lock() {
                    gates.remove(&uid);
                }
                set.remove(&uid);
            }
        }
    }

    /// Remembers the status the API has for a pod this node sees for the first time.
    pub fn inherit(&self, uid: PodUid, status: Option<PodStatus>) {
        let Some(status) = status.filter(|s| s.phase.is_some()) else {
            return;
        };
        if let Ok(mut inherited) = self.inherited.lock() {
            inherited.entry(uid).or_insert(status);
        }
    }

    fn inherited(&self, uid: &PodUid) -> Option<PodStatus> {
        self.inherited.lock().ok()?.get(uid).cloned()
    }

    fn is_known(&self, uid: &PodUid) -> bool {
        self.known.lock().is_ok_and(|known| known.contains(uid))
    }
}

/// The owner's side of the board.
pub struct ApiStatusSink(pub Arc<StatusBoard>);

impl StatusSink for ApiStatusSink {
    fn status_changed(
        &mut self,
        pod: &PodRef,
        _spec: Option<&PodSpec>,
        status: &PodStatus,
        agent: Option<PeerId>,
    ) {
        let update = Update::Status {
            pod: pod.clone(),
            status: Box::new(status.clone()),
            agent,
        };
        self.0.post(pod.uid.clone(), update);
    }

    fn removed(&mut self, pod: &PodRef) {
        self.0
            .post(pod.uid.clone(), Update::Removed { pod: pod.clone() });
    }

    fn events(&mut self, pod: &PodRef, events: &[AgentEvent]) {
        let events = events
            .iter()
            .filter_map(|event| {
                let (reason, warning) = event.reason.kubernetes()?;
                Some(PodEvent {
                    warning,
                    reason,
                    message: event.message.clone(),
                })
            })
            .collect();
        self.0.post_events(pod, events);
    }

    fn last_known(&self, pod: &PodUid) -> Option<PodStatus> {
        self.0.inherited(pod)
    }
}

/// The annotation that shows a pod's address on its agent's Podman network.
pub const MESH_IP_ANNOTATION: &str = "beemesh.io/mesh-ip";

/// The patch of the pods/status subresource (which takes metadata too, as the API
/// server's pod status strategy resets only the spec, deletionTimestamp and
/// ownerReferences): the status as the API shows it, and the pod's mesh IP in an
/// annotation.
///
/// The pod is bound to this node already, so a pod the mesh cannot place yet shows
/// PodScheduled True and the mesh's reason and message at the top, where `kubectl get`
/// shows them.
///
/// With readiness gates, Ready also needs each gate's condition True, as the kubelet
/// counts it.
///
/// `podIP` stays empty: the agent's address of a pod is not one the cluster can reach,
/// and the EndpointSlice controller would put it behind every Service that selects the
/// pod. It is shown in [`MESH_IP_ANNOTATION`] instead.
pub fn api_patch(status: &PodStatus, gates: &Gates) -> Value {
    let mut status = status.clone();
    let mesh_ip = status.pod_ip.take().filter(|ip| !ip.is_empty());
    status.pod_ips = None;
    let unmet = gates.unmet();
    let ready = status
        .conditions
        .iter_mut()
        .flatten()
        .find(|c| c.type_ == "Ready" && c.status == "True");
    if let Some(ready) = ready.filter(|_| !unmet.is_empty()) {
        ready.status = "False".into();
        ready.reason = Some("ReadinessGatesNotReady".into());
        ready.message = Some(unmet.join(", "));
    }
    let mesh_pending = status
        .conditions
        .iter_mut()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(condition) = mesh_pending {
        if status.reason.is_none() {
            status.reason = condition.reason.take();
            status.message = condition.message.take();
        }
        condition.status = "True".into();
        condition.reason = None;
        condition.message = None;
    }
    if status.host_ips.is_none() {
        status.host_ips = status
            .host_ip
            .clone()
            .map(|ip| vec![k8s_openapi::api::core::v1::HostIP { ip }]);
    }
    let mut value = serde_json::to_value(&status).unwrap_or_else(|_| json!({}));
    if let Value::Object(fields) = &mut value {
        for field in OWNED_FIELDS {
            fields.entry(field).or_insert(Value::Null);
        }
    }
    let mut metadata = json!({"annotations": {MESH_IP_ANNOTATION: mesh_ip}});
    if let Some(role) = group_role(&status) {
        metadata["labels"] = json!({ GROUP_ROLE_LABEL: role });
    }
    json!({"metadata": metadata, "status": value})
}

/// The [`GROUP_ROLE_LABEL`] of a stateful workload's pod, from its group condition:
/// `leader` or `follower` while the group is ready, else none (null, which removes it).
/// None for other pods, whose labels the node leaves alone.
fn group_role(status: &PodStatus) -> Option<Value> {
    let condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == GROUP_READY_CONDITION)?;
    let role = match condition.reason.as_deref() {
        Some("Leader") if condition.status == "True" => json!("leader"),
        Some("Follower") if condition.status == "True" => json!("follower"),
        _ => Value::Null,
    };
    Some(role)
}

/// Writes the board to the API until cancelled.
pub async fn run(
    client: Client,
    board: Arc<StatusBoard>,
    events: EventRecorder,
    cancel: CancellationToken,
) {
    let mut sent: HashMap<PodUid, Value> = HashMap::new();
    // Only pods whose last write failed have an entry.
    let mut backoff: Backoff<PodUid> = Backoff::new(RETRY, RETRY_MAX);
    // The last status update of each pod: what events are told from, and what is
    // written again when its gates change.
    let mut last: HashMap<PodUid, Update> = HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = board.notify.notified() => {}
        }
        tokio::time::sleep(COALESCE).await;
        for (pod, pod_events) in board.take_events() {
            if board.is_known(&pod.uid) {
                events.record(&pod, pod_events);
            }
        }
        for uid in board.take_regated() {
            if let Some(update) = last.get(&uid) {
                board.retry(uid, update.clone());
            }
        }
        let mut failed = false;
        for (uid, update) in board.take() {
            if !board.is_known(&uid) {
                sent.remove(&uid);
                last.remove(&uid);
                backoff.retain(|u| *u != uid);
                continue;
            }
            if !backoff.try_now(uid.clone(), Instant::now()) {
                board.retry(uid, update);
                failed = true;
                continue;
            }
            let ok = match &update {
                Update::Status { pod, status, agent } => {
                    // First word after a restart: told against the API's status, with
                    // the agent of a pod placed then taken as unchanged (one that
                    // changed was reported without an agent first, when its pod was
                    // lost).
                    let inherited = board.inherited(&uid).map(|s| {
                        let same_agent = was_placed(&s).then_some(*agent).flatten();
                        (s, same_agent)
                    });
                    let seen = match last.get(&uid) {
                        Some(Update::Status { status, agent, .. }) => Some((&**status, *agent)),
                        _ => None,
                    };
                    let previous = seen.or(inherited.as_ref().map(|(s, a)| (s, *a)));
                    events.record(pod, transition_events(pod, previous, status, *agent));
                    last.insert(uid.clone(), update.clone());
                    let value = api_patch(status, &board.gates(&uid));
                    if sent.get(&uid) == Some(&value) {
                        true
                    } else {
                        match write_status(&client, pod, &value).await {
                            Ok(()) => {
                                sent.insert(uid.clone(), value);
                                true
                            }
                            Err(e) => {
                                tracing::warn!(%pod, error = %e, "cannot write pod status");
                                !is_retryable(&e)
                            }
                        }
                    }
                }
                Update::Removed { pod } => match delete_now(&client, pod).await {
                    Ok(()) => {
                        tracing::info!(%pod, "pod deleted from the API");
                        sent.remove(&uid);
                        last.remove(&uid);
                        true
                    }
                    Err(e) => {
                        tracing::warn!(%pod, error = %e, "cannot delete the pod");
                        !is_retryable(&e)
                    }
                },
            };
            if ok {
                backoff.retain(|u| *u != uid);
            } else {
                board.retry(uid, update);
                failed = true;
            }
        }
        if failed {
            tokio::time::sleep(RETRY).await;
            board.notify.notify_one();
        }
    }
}

/// Gone (404), replaced by a namesake (409 on the uid precondition) or refused as
/// invalid (422): writing again would not help.
fn is_retryable(error: &kube::Error) -> bool {
    !matches!(error, kube::Error::Api(status) if status.code == 404
        || status.code == 422
        || status.code == 409 && status.message.contains("Precondition failed"))
}

async fn write_status(client: &Client, pod: &PodRef, patch: &Value) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    // The uid makes the patch apply to this pod only, not to a new one of the same name.
    let mut patch = patch.clone();
    patch["metadata"]["uid"] = json!(pod.uid.0);
    api.patch_status(
        &pod.name,
        &PatchParams::default(),
        &Patch::Strategic(&patch),
    )
    .await
    .map(drop)
}

async fn delete_now(client: &Client, pod: &PodRef) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(pod.uid.0.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_the_mesh_cannot_place_shows_the_mesh_reason_and_stays_scheduled() {
        let status: PodStatus = serde_json::from_value(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/2 agents fit: 2 insufficient memory"}]}))
        .expect("status");
        let value = &api_patch(&status, &Gates::default())["status"];
        assert_eq!(value["reason"], "Unschedulable");
        assert_eq!(value["message"], "0/2 agents fit: 2 insufficient memory");
        assert_eq!(value["conditions"][0]["status"], "True");
        assert!(value["conditions"][0].get("reason").is_none());
        // Owned fields that are unset are cleared; conditions never are (others'
        // conditions would go with them).
        assert_eq!(value["podIP"], Value::Null);
        assert_eq!(value["containerStatuses"], Value::Null);
        let unset = &api_patch(&PodStatus::default(), &Gates::default())["status"];
        assert!(unset.get("conditions").is_none(), "{unset}");
    }

    #[test]
    fn a_grouped_pod_is_labelled_with_its_role_and_other_pods_labels_are_left_alone() {
        let group = |status: &str, reason: &str| -> PodStatus {
            serde_json::from_value(json!({"phase": "Running", "conditions": [
                {"type": GROUP_READY_CONDITION, "status": status, "reason": reason}]}))
            .expect("status")
        };
        let labels =
            |status: &PodStatus| api_patch(status, &Gates::default())["metadata"]["labels"].clone();
        assert_eq!(
            labels(&group("True", "Leader")),
            json!({GROUP_ROLE_LABEL: "leader"})
        );
        assert_eq!(
            labels(&group("True", "Follower")),
            json!({GROUP_ROLE_LABEL: "follower"})
        );
        assert_eq!(
            labels(&group("False", "NoLeader")),
            json!({GROUP_ROLE_LABEL: null})
        );
        let plain = api_patch(&PodStatus::default(), &Gates::default());
        assert!(plain["metadata"].get("labels").is_none(), "{plain}");
    }

    #[test]
    fn readiness_gates_hold_ready_back_until_their_conditions_are_true() {
        let status: PodStatus = serde_json::from_value(json!({"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}))
        .expect("status");
        let pod = |conditions: Value| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"containers": [], "readinessGates": [
                    {"conditionType": "example.com/lb"}, {"conditionType": "example.com/dns"}]},
                "status": {"conditions": conditions}
            }))
            .expect("pod")
        };
        let none = &api_patch(&status, &Gates::of(&pod(json!([]))))["status"];
        assert_eq!(none["conditions"][0]["status"], "False");
        assert_eq!(none["conditions"][0]["reason"], "ReadinessGatesNotReady");
        assert_eq!(
            none["conditions"][0]["message"],
            "corresponding condition of pod readiness gate \"example.com/lb\" does not exist., \
             corresponding condition of pod readiness gate \"example.com/dns\" does not exist."
        );
        // ContainersReady is the containers' alone.
        assert_eq!(none["conditions"][1]["status"], "True");
        let half = Gates::of(&pod(json!([
            {"type": "example.com/lb", "status": "True"},
            {"type": "example.com/dns", "status": "False"}])));
        assert_eq!(
            api_patch(&status, &half)["status"]["conditions"][0]["message"],
            "the status of pod readiness gate \"example.com/dns\" is not \"True\", but False"
        );
        let met = Gates::of(&pod(json!([
            {"type": "example.com/lb", "status": "True"},
            {"type": "example.com/dns", "status": "True"}])));
        assert_eq!(
            api_patch(&status, &met)["status"]["conditions"][0]["status"],
            "True"
        );
    }

    #[test]
    fn the_mesh_ip_is_an_annotation_and_the_pod_ip_stays_empty() {
        let status: PodStatus = serde_json::from_value(json!({"phase": "Running",
            "podIP": "10.88.0.5", "podIPs": [{"ip": "10.88.0.5"}], "hostIP": "192.168.1.20"}))
        .expect("status");
        let patch = api_patch(&status, &Gates::default());
        assert_eq!(
            patch["metadata"]["annotations"][MESH_IP_ANNOTATION],
            "10.88.0.5"
        );
        // Sent as null: an address published before is taken back.
        assert_eq!(patch["status"]["podIP"], Value::Null);
        assert_eq!(patch["status"]["podIPs"], Value::Null);
        assert_eq!(patch["status"]["hostIPs"], json!([{"ip": "192.168.1.20"}]));
        assert_eq!(patch["status"]["reason"], Value::Null);
        let pending = api_patch(&PodStatus::default(), &Gates::default());
        assert_eq!(
            pending["metadata"]["annotations"][MESH_IP_ANNOTATION],
            Value::Null
        );
    }

    #[test]
    fn the_board_keeps_only_the_latest_update_per_pod() {
        let board = StatusBoard::default();
        let pod = PodRef {
            uid: PodUid("u".into()),
            namespace: "default".into(),
            name: "web".into(),
        };
        let mut sink = ApiStatusSink(Arc::new(board));
        for phase in ["Pending", "Running", "Succeeded"] {
            let status = PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            };
            sink.status_changed(&pod, None, &status, None);
        }
        let taken = sink.0.take();
        assert_eq!(taken.len(), 1);
        assert!(
            matches!(&taken[&pod.uid], Update::Status { status, .. } if status.phase.as_deref() == Some("Succeeded"))
        );
        assert!(sink.0.take().is_empty());
    }
}
