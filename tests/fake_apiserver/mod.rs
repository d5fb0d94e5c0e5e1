//! A test-only Kubernetes API server that follows the real API's documented semantics
//! (and the responses recorded from k3s in tests/fixtures and ../shared/fixtures):
//! resourceVersion on every write, list and watch with field and label selectors,
//! watch bookmarks and `410 Expired`, the status subresource, merge, strategic-merge
//! and apply patches, 404/409 errors in the API's Status shape, graceful deletion of
//! bound pods, and a scheduler that binds a pod to a node only if the pod tolerates
//! the node's taints and matches its labels.
//!
//! Not a real API server: no authentication, admission, field validation, OpenAPI,
//! or server-side apply field ownership (apply is a merge). Clients talk plain HTTP.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::{Filter, Reply as _};

/// How many events a watch can resume from; older resourceVersions get 410.
const HISTORY: usize = 1000;

#[derive(Debug, Clone, Copy)]
struct Resource {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "serviceaccounts",
        kind: "ServiceAccount",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
    },
    Resource {
        group: "events.k8s.io",
        version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
];

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn find(group: &str, version: &str, plural: &str) -> Option<Resource> {
        RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    group: &'static str,
    plural: &'static str,
    namespace: String,
    name: String,
}

#[derive(Debug, Clone)]
struct WatchEvent {
    rv: u64,
    kind: &'static str,
    key: Key,
    object: Value,
}

struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<WatchEvent>,
    events: broadcast::Sender<WatchEvent>,
    uid_counter: u64,
}

/// The fake server; stops when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    stop: CancellationToken,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Reply = warp::reply::Response;

/// An API error: its HTTP code and the Status object the API server sends.
struct ApiError {
    code: u16,
    body: Value,
}

impl ApiError {
    fn reply(self) -> Reply {
        reply_json(self.code, &self.body)
    }
}

fn status(code: u16, reason: &str, message: String, details: Option<(&str, &str)>) -> ApiError {
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some((name, kind)) = details {
        body["details"] = json!({ "name": name, "kind": kind });
    }
    ApiError { code, body }
}

fn reply_json(code: u16, body: &Value) -> Reply {
    let mut reply = warp::reply::Response::new(body.to_string().into());
    *reply.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    reply.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    reply
}

fn not_found(resource: &Resource, name: &str) -> ApiError {
    status(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", resource.plural),
        Some((name, resource.plural)),
    )
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn query_map(query: &str) -> BTreeMap<String, String> {
    url_pairs(query).collect()
}

fn url_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A field value by dotted path (`spec.nodeName`, `metadata.name`).
fn field(object: &Value, path: &str) -> String {
    let mut current = object;
    for part in path.split('.') {
        current = match current.get(part) {
            Some(v) => v,
            None => return String::new(),
        };
    }
    match current {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `a=b,c!=d` over fields; the API server supports `=`, `==` and `!=`.
fn field_selector_matches(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            field(object, k) != v
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            field(object, k) == v
        } else {
            false
        }
    })
}

/// Equality-based label selectors (`a=b,c!=d,e`, `!f`).
fn label_selector_matches(selector: &str, object: &Value) -> bool {
    let labels = object["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let label = |k: &str| {
            labels
                .get(k.trim())
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else if let Some((k, v)) = term.split_once("!=") {
            label(k).as_deref() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k).as_deref() == Some(v.trim())
        } else {
            label(term).is_some()
        }
    })
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Some(map) = target.as_object_mut() {
                for (k, v) in fields {
                    if v.is_null() {
                        map.remove(k);
                    } else {
                        merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The merge keys of the lists BeeMesh and kubectl patch, from the Kubernetes API's
/// `patchMergeKey` annotations.
fn merge_key(list: &str) -> Option<&'static str> {
    Some(match list {
        "conditions" => "type",
        "containerStatuses"
        | "initContainerStatuses"
        | "ephemeralContainerStatuses"
        | "containers"
        | "initContainers"
        | "volumes"
        | "env"
        | "volumeMounts" => "name",
        "podIPs" | "hostIPs" => "ip",
        "addresses" => "type",
        "taints" => "key",
        "ports" => "containerPort",
        _ => return None,
    })
}

/// Strategic merge patch: a merge patch in which lists with a merge key are merged
/// element by element (`$patch: delete` removes one), as the API server does.
fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(map) = target.as_object_mut() else {
        return;
    };
    for (k, v) in fields {
        if k.starts_with("$setElementOrder") || k == "$retainKeys" {
            continue;
        }
        match (v, merge_key(k)) {
            (Value::Null, _) => {
                map.remove(k);
            }
            (Value::Array(items), Some(key)) => {
                let list = map.entry(k.clone()).or_insert(Value::Array(vec![]));
                if !list.is_array() {
                    *list = Value::Array(vec![]);
                }
                let Some(existing) = list.as_array_mut() else {
                    continue;
                };
                for item in items {
                    let id = item.get(key).cloned();
                    let position = id
                        .as_ref()
                        .and_then(|id| existing.iter().position(|e| e.get(key) == Some(id)));
                    let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                    match (position, delete) {
                        (Some(i), true) => {
                            existing.remove(i);
                        }
                        (None, true) => {}
                        (Some(i), false) => strategic_merge_patch(&mut existing[i], item),
                        (None, false) => existing.push(item.clone()),
                    }
                }
            }
            (Value::Object(_), _) => {
                strategic_merge_patch(map.entry(k.clone()).or_insert(Value::Null), v)
            }
            _ => {
                map.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Store {
    fn new() -> Store {
        let (events, _) = broadcast::channel(4096);
        let mut store = Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            events,
            uid_counter: 0,
        };
        for ns in ["default", "kube-system", "kube-node-lease", "kube-public"] {
            let resource = Resource::find("", "v1", "namespaces").expect("namespaces");
            let _ = store.create(&resource, "", json!({"metadata": {"name": ns}}));
        }
        store
    }

    fn new_uid(&mut self) -> String {
        self.uid_counter += 1;
        let seed = format!(
            "{}-{}-{:?}",
            self.uid_counter,
            std::process::id(),
            std::time::SystemTime::now()
        );
        let h = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes()));
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    fn key(resource: &Resource, namespace: &str, name: &str) -> Key {
        Key {
            group: resource.group,
            plural: resource.plural,
            namespace: if resource.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    /// Stores a write: a new resourceVersion, history and watchers.
    fn record(&mut self, kind: &'static str, key: Key, mut object: Value) -> Value {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if kind == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        let event = WatchEvent {
            rv: self.rv,
            kind,
            key,
            object: object.clone(),
        };
        self.history.push_back(event.clone());
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let _ = self.events.send(event);
        object
    }

    fn create(
        &mut self,
        resource: &Resource,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = if name.is_empty() {
            match object["metadata"]["generateName"].as_str() {
                Some(prefix) => format!("{prefix}{}", &self.new_uid()[..5]),
                None => {
                    return Err(status(422, "Invalid", format!("{} \"\" is invalid: metadata.name: Required value: name or generateName is required", resource.kind), None))
                }
            }
        } else {
            name
        };
        if resource.namespaced {
            let ns = Store::key(
                &Resource::find("", "v1", "namespaces").expect("ns"),
                "",
                namespace,
            );
            if !self.objects.contains_key(&ns) {
                return Err(status(
                    404,
                    "NotFound",
                    format!("namespaces \"{namespace}\" not found"),
                    Some((namespace, "namespaces")),
                ));
            }
        }
        let key = Store::key(resource, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(status(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.plural),
                Some((&name, resource.plural)),
            ));
        }
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        object["metadata"]["name"] = json!(name);
        if resource.namespaced {
            object["metadata"]["namespace"] = json!(namespace);
        }
        object["metadata"]["uid"] = json!(self.new_uid());
        object["metadata"]["creationTimestamp"] = json!(now());
        if resource.plural == "pods" {
            default_pod(&mut object);
        }
        let stored = self.record("ADDED", key, object);
        if resource.plural == "pods" || resource.plural == "nodes" {
            self.schedule();
        }
        Ok(stored)
    }

    /// Binds pending pods to the first node they fit, as kube-scheduler would for a
    /// virtual node: taints tolerated, nodeSelector matched, node Ready or not.
    fn schedule(&mut self) {
        let nodes: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.plural == "nodes" && k.group.is_empty())
            .map(|(_, v)| v.clone())
            .collect();
        let pending: Vec<(Key, Value)> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                k.plural == "pods"
                    && field(v, "spec.nodeName").is_empty()
                    && v["metadata"]["deletionTimestamp"].is_null()
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, mut pod) in pending {
            let Some(node) = nodes.iter().find(|n| schedulable(&pod, n)) else {
                continue;
            };
            pod["spec"]["nodeName"] = node["metadata"]["name"].clone();
            let condition =
                json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now()});
            pod["status"]["conditions"] = json!([condition]);
            self.record("MODIFIED", key, pod);
        }
    }
}

fn tolerates(pod: &Value, taint: &Value) -> bool {
    let tolerations = pod["spec"]["tolerations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    tolerations.iter().any(|t| {
        let key_ok = t["key"].is_null() && t["operator"] == "Exists"
            || t["key"] == taint["key"]
                && (t["operator"] == "Exists"
                    || t["value"] == taint["value"]
                    || (t["value"].is_null() && taint["value"].is_null()));
        let effect_ok = t["effect"].is_null() || t["effect"] == taint["effect"];
        key_ok && effect_ok
    })
}

fn schedulable(pod: &Value, node: &Value) -> bool {
    let taints = node["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tolerated = taints
        .iter()
        .filter(|t| t["effect"] == "NoSchedule" || t["effect"] == "NoExecute")
        .all(|t| tolerates(pod, t));
    let labels = node["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let selected = pod["spec"]["nodeSelector"]
        .as_object()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    tolerated && selected && node["spec"]["unschedulable"] != true
}

/// The defaults the API server fills into a new pod.
fn default_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("serviceAccountName", json!("default")),
        ("enableServiceLinks", json!(true)),
        ("securityContext", json!({})),
        ("priority", json!(0)),
    ] {
        if spec[k].is_null() {
            spec[k] = v;
        }
    }
    for list in ["initContainers", "containers"] {
        if let Some(containers) = spec[list].as_array_mut() {
            for c in containers {
                let image = c["image"].as_str().unwrap_or_default().to_string();
                let last = image.rsplit('/').next().unwrap_or_default();
                let latest = !image.contains('@')
                    && last.rsplit_once(':').is_none_or(|(_, t)| t == "latest");
                for (k, v) in [
                    ("terminationMessagePath", json!("/dev/termination-log")),
                    ("terminationMessagePolicy", json!("File")),
                    (
                        "imagePullPolicy",
                        json!(if latest { "Always" } else { "IfNotPresent" }),
                    ),
                    ("resources", json!({})),
                ] {
                    if c[k].is_null() {
                        c[k] = v;
                    }
                }
            }
        }
    }
    if pod["status"].is_null() {
        pod["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
    }
}

/// A parsed request path.
struct Target {
    resource: Resource,
    namespace: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (ns.to_string(), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        other => (String::new(), other.to_vec()),
    };
    let plural = rest.first()?;
    let resource = Resource::find(group, version, plural)?;
    Some(Target {
        resource,
        namespace,
        name: rest.get(1).map(|s| percent_decode(s)),
        subresource: rest.get(2).map(|s| s.to_string()),
    })
}

fn discovery(path: &str) -> Option<Value> {
    let path = path.trim_end_matches('/');
    let resources = |group: &str, version: &str| -> Value {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .flat_map(|r| {
                let verbs = json!(["create", "delete", "get", "list", "patch", "update", "watch"]);
                let mut out = vec![json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs})];
                if matches!(r.plural, "pods" | "nodes") {
                    out.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
                }
                out
            })
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": if group.is_empty() { version.to_string() } else { format!("{group}/{version}") }, "resources": list})
    };
    Some(match path {
        "/version" => {
            json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0+fake", "platform": "linux/amd64"})
        }
        "/api" => {
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        }
        "/api/v1" => resources("", "v1"),
        "/apis" => {
            let groups: Vec<Value> = ["coordination.k8s.io", "events.k8s.io"]
                .iter()
                .map(|g| json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}}))
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        "/apis/coordination.k8s.io/v1" => resources("coordination.k8s.io", "v1"),
        "/apis/events.k8s.io/v1" => resources("events.k8s.io", "v1"),
        _ => return None,
    })
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let store = Arc::new(Mutex::new(Store::new()));
        let stop = CancellationToken::new();
        let handler_store = store.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::optional::<String>("content-type"))
            .and(warp::body::bytes())
            .then(
                move |method: warp::http::Method,
                      path: warp::path::FullPath,
                      query: String,
                      content_type: Option<String>,
                      body: warp::hyper::body::Bytes| {
                    let store = handler_store.clone();
                    async move {
                        route(
                            store,
                            method,
                            path.as_str().to_string(),
                            query,
                            content_type,
                            body.to_vec(),
                        )
                        .unwrap_or_else(ApiError::reply)
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let until = stop.clone();
        tokio::spawn(async move {
            warp::serve(route)
                .incoming(listener)
                .graceful(async move { until.cancelled().await })
                .run()
                .await;
        });
        FakeApiServer { addr, store, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: tester\n  user: {{token: fake-token}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: tester, namespace: default}}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Drops the history a watch could resume from (what etcd compaction does).
    pub fn compact(&self) {
        let mut store = self.store.lock().expect("store");
        store.history.clear();
    }

    /// The stored object, as a test checks it.
    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = self.store.lock().expect("store");
        store
            .objects
            .iter()
            .find(|(k, _)| k.plural == plural && k.namespace == namespace && k.name == name)
            .map(|(_, v)| v.clone())
    }
}

fn route(
    store: Arc<Mutex<Store>>,
    method: warp::http::Method,
    path: String,
    query: String,
    content_type: Option<String>,
    body: Vec<u8>,
) -> Result<Reply, ApiError> {
    if method == warp::http::Method::GET {
        if let Some(doc) = discovery(&path) {
            return Ok(reply_json(200, &doc));
        }
    }
    let Some(target) = parse_path(&path) else {
        return Err(status(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
            None,
        ));
    };
    let params = query_map(&query);
    let parse_body = || -> Result<Value, ApiError> {
        let text = String::from_utf8_lossy(&body);
        // Apply patches may be YAML; JSON is YAML.
        serde_yaml::from_str::<Value>(&text)
            .map_err(|e| status(400, "BadRequest", format!("invalid body: {e}"), None))
    };
    match (method.as_str(), &target.name) {
        ("GET", None) if params.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            Ok(watch(store, target, params))
        }
        ("GET", None) => Ok(list(&store, &target, &params)),
        ("GET", Some(name)) => {
            let store = store.lock().expect("store");
            match store
                .objects
                .get(&Store::key(&target.resource, &target.namespace, name))
            {
                Some(object) => Ok(reply_json(200, object)),
                None => Err(not_found(&target.resource, name)),
            }
        }
        ("POST", _) if target.subresource.is_none() => {
            let object = parse_body()?;
            let mut store = store.lock().expect("store");
            let created = store.create(&target.resource, &target.namespace, object)?;
            Ok(reply_json(201, &created))
        }
        ("PUT", Some(name)) => {
            let object = parse_body()?;
            update(&store, &target, name, |stored| {
                let sent_rv = object["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if !sent_rv.is_empty()
                    && sent_rv
                        != stored["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or_default()
                {
                    return Err(status(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again", target.resource.plural), Some((name, target.resource.plural))));
                }
                Ok(if target.subresource.as_deref() == Some("status") {
                    let mut next = stored.clone();
                    next["status"] = object["status"].clone();
                    next
                } else {
                    let mut next = object.clone();
                    next["status"] = if object["status"].is_null() {
                        stored["status"].clone()
                    } else {
                        object["status"].clone()
                    };
                    next
                })
            })
        }
        ("PATCH", Some(name)) => {
            let patch = parse_body()?;
            let kind = content_type.unwrap_or_default();
            update(&store, &target, name, |stored| {
                let mut next = stored.clone();
                let apply = |target: &mut Value, patch: &Value| {
                    if kind.starts_with("application/strategic-merge-patch+json") {
                        strategic_merge_patch(target, patch);
                        Ok(())
                    } else if kind.starts_with("application/merge-patch+json")
                        || kind.starts_with("application/apply-patch+yaml")
                    {
                        merge_patch(target, patch);
                        Ok(())
                    } else {
                        Err(status(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {kind:?})"), None))
                    }
                };
                if target.subresource.as_deref() == Some("status") {
                    // Only status changes through the subresource.
                    let mut status_patch = json!({});
                    status_patch["status"] = patch["status"].clone();
                    apply(&mut next, &status_patch)?;
                } else {
                    apply(&mut next, &patch)?;
                    next["status"] = stored["status"].clone();
                }
                Ok(next)
            })
        }
        ("DELETE", Some(name)) => {
            let grace_param = params
                .get("gracePeriodSeconds")
                .and_then(|g| g.parse::<i64>().ok());
            let grace_body = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|b| b["gracePeriodSeconds"].as_i64());
            delete(&store, &target, name, grace_param.or(grace_body))
        }
        _ => Err(status(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
            None,
        )),
    }
}

fn list(store: &Arc<Mutex<Store>>, target: &Target, params: &BTreeMap<String, String>) -> Reply {
    let store = store.lock().expect("store");
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|(k, _)| k.group == target.resource.group && k.plural == target.resource.plural)
        .filter(|(k, _)| target.namespace.is_empty() || k.namespace == target.namespace)
        .filter(|(_, v)| {
            params
                .get("fieldSelector")
                .is_none_or(|s| field_selector_matches(s, v))
        })
        .filter(|(_, v)| {
            params
                .get("labelSelector")
                .is_none_or(|s| label_selector_matches(s, v))
        })
        .map(|(_, v)| v.clone())
        .collect();
    reply_json(
        200,
        &json!({
            "kind": format!("{}List", target.resource.kind),
            "apiVersion": target.resource.api_version(),
            "metadata": {"resourceVersion": store.rv.to_string()},
            "items": items,
        }),
    )
}

fn update(
    store: &Arc<Mutex<Store>>,
    target: &Target,
    name: &str,
    change: impl FnOnce(&Value) -> Result<Value, ApiError>,
) -> Result<Reply, ApiError> {
    let mut store = store.lock().expect("store");
    let key = Store::key(&target.resource, &target.namespace, name);
    let Some(stored) = store.objects.get(&key).cloned() else {
        return Err(not_found(&target.resource, name));
    };
    let mut next = change(&stored)?;
    // Identity is the server's, whatever the client sent.
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        next["metadata"][field] = stored["metadata"][field].clone();
        if next["metadata"][field].is_null() {
            if let Some(m) = next["metadata"].as_object_mut() {
                m.remove(field);
            }
        }
    }
    next["apiVersion"] = stored["apiVersion"].clone();
    next["kind"] = stored["kind"].clone();
    if next == stored {
        return Ok(reply_json(200, &stored));
    }
    let updated = store.record("MODIFIED", key, next);
    if target.resource.plural == "nodes" {
        store.schedule();
    }
    Ok(reply_json(200, &updated))
}

fn delete(
    store: &Arc<Mutex<Store>>,
    target: &Target,
    name: &str,
    grace: Option<i64>,
) -> Result<Reply, ApiError> {
    let mut store = store.lock().expect("store");
    let key = Store::key(&target.resource, &target.namespace, name);
    let Some(mut object) = store.objects.get(&key).cloned() else {
        return Err(not_found(&target.resource, name));
    };
    // A pod bound to a node is only marked: its kubelet stops it, then deletes it
    // with grace 0. Unbound pods, and grace 0, go at once.
    let bound = target.resource.plural == "pods" && !field(&object, "spec.nodeName").is_empty();
    let grace = grace.unwrap_or_else(|| {
        object["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30)
    });
    if bound && grace > 0 {
        if object["metadata"]["deletionTimestamp"].is_null() {
            object["metadata"]["deletionTimestamp"] = json!(now());
            object["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            let marked = store.record("MODIFIED", key, object);
            return Ok(reply_json(200, &marked));
        }
        return Ok(reply_json(200, &object));
    }
    let deleted = store.record("DELETED", key, object);
    Ok(reply_json(200, &deleted))
}

fn watch(store: Arc<Mutex<Store>>, target: Target, params: BTreeMap<String, String>) -> Reply {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(256);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let matches = {
        let target_group = target.resource.group;
        let target_plural = target.resource.plural;
        let namespace = target.namespace.clone();
        let fields = params.get("fieldSelector").cloned().unwrap_or_default();
        let labels = params.get("labelSelector").cloned().unwrap_or_default();
        move |key: &Key, object: &Value| {
            key.group == target_group
                && key.plural == target_plural
                && (namespace.is_empty() || key.namespace == namespace)
                && field_selector_matches(&fields, object)
                && label_selector_matches(&labels, object)
        }
    };
    let line = |kind: &str, object: &Value| -> Vec<u8> {
        let mut bytes = json!({"type": kind, "object": object})
            .to_string()
            .into_bytes();
        bytes.push(b'\n');
        bytes
    };
    // Under the lock: what to replay, and the live subscription, so nothing falls
    // between the two.
    let (backlog, mut live, kind) = {
        let store = store.lock().expect("store");
        let live = store.events.subscribe();
        let since = params
            .get("resourceVersion")
            .and_then(|rv| rv.parse::<u64>().ok())
            .filter(|rv| *rv > 0);
        let backlog: Result<Vec<Vec<u8>>, Vec<u8>> = match since {
            None => Ok(store
                .objects
                .iter()
                .filter(|(k, v)| matches(k, v))
                .map(|(_, v)| line("ADDED", v))
                .collect()),
            Some(rv) => {
                let oldest = store.history.front().map_or(store.rv + 1, |e| e.rv);
                if rv + 1 < oldest && rv < store.rv {
                    Err(line(
                        "ERROR",
                        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("too old resource version: {rv} ({})", oldest.saturating_sub(1)), "reason": "Expired", "code": 410}),
                    ))
                } else {
                    Ok(store
                        .history
                        .iter()
                        .filter(|e| e.rv > rv && matches(&e.key, &e.object))
                        .map(|e| line(e.kind, &e.object))
                        .collect())
                }
            }
        };
        (backlog, live, target.resource.kind)
    };
    let store_for_bookmarks = store.clone();
    tokio::spawn(async move {
        let lines = match backlog {
            Ok(lines) => lines,
            Err(error) => {
                let _ = tx.send(Ok(error)).await;
                return;
            }
        };
        for l in lines {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(Duration::from_secs(1));
        bookmark.reset();
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = bookmark.tick(), if bookmarks => {
                    let rv = store_for_bookmarks.lock().map(|s| s.rv).unwrap_or(0);
                    let object = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null}});
                    if tx.send(Ok(line("BOOKMARK", &object))).await.is_err() {
                        return;
                    }
                }
                event = live.recv() => match event {
                    Ok(e) if matches(&e.key, &e.object) => {
                        if tx.send(Ok(line(e.kind, &e.object))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // A watcher this far behind is what the real server expires.
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut reply = warp::reply::stream(stream).into_response();
    reply.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    reply
}
