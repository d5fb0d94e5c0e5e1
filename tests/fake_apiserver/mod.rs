//! A test-only Kubernetes API server that follows the real API's documented semantics
//! (and the responses recorded from k3s in tests/fixtures and ../shared/fixtures):
//! resourceVersion on every write, list and watch with field and label selectors,
//! watch bookmarks and `410 Expired`, the status subresource, merge, strategic-merge
//! and apply patches, 404/409 errors in the API's Status shape, graceful deletion of
//! bound pods, and a scheduler that binds a pod to a node only if the pod tolerates
//! the node's taints and matches its labels.
//!
//! What a cluster's controllers and admission add: every namespace has ServiceAccount
//! `default` and ConfigMap `kube-root-ca.crt`; pod create runs ServiceAccount admission
//! (default account, 403 for a missing one, the `kube-api-access-*` projected token
//! volume) and DefaultTolerationSeconds. `serviceaccounts/NAME/token` answers
//! TokenRequests with JWT-shaped (unsigned) tokens, recorded for
//! [`FakeApiServer::tokens_issued`]. `/openapi/v3` serves documents generated from
//! the real v1.32 definitions (tests/fixtures/openapi-v3), and writes honour
//! `fieldValidation` (Strict/Warn/Ignore) against them. `kubectl get` of pods and
//! events gets server-side Tables.
//!
//! PKI and the kubelet side (pki.rs, kubelet_proxy.rs): a cluster CA (published in
//! `kube-root-ca.crt`) and a client CA (published as `client-ca-file` in
//! kube-system/extension-apiserver-authentication, as recorded); certificates.k8s.io/v1
//! CertificateSigningRequests with `/approval` and `/status`; the csrsigning controllers
//! for `kubernetes.io/kubelet-serving` (cluster CA) and
//! `kubernetes.io/kube-apiserver-client-kubelet` (client CA, as k3s configures it); the
//! csrapproving controller, which approves kubelet client requests (reason AutoApproved)
//! when a SubjectAccessReview lets the requester `create`
//! `certificatesigningrequests/selfnodeclient` (their own CN) or `.../nodeclient`, run
//! again on every CSR or RBAC write (bootstrap policy's two ClusterRoles for that exist,
//! unbound); TokenReview for the fake's tokens; SubjectAccessReview over stored RBAC
//! objects (`system:masters` always allowed); and pods' `log`, `exec`, `attach` and
//! `portforward` proxied to the node's kubelet over TLS (kubelet certificate verified
//! against the cluster CA, client certificate CN=kube-apiserver from the client CA),
//! upgrades passed through.
//!
//! k3s mode ([`FakeApiServer::start_k3s`], tunnel.rs): what a k3s server adds in front
//! of its API server. HTTPS (certificate for 127.0.0.1 and localhost from the cluster CA;
//! client certificates optional, verified against the client CA when offered, and then
//! the requester's identity: CN user, O groups); ALPN http/1.1; a k3s `/version`; the
//! `default/kubernetes` Endpoints listing each listener; and the agent tunnel at
//! `GET /v1-k3s/connect`: the supervisor's `HasRole(system:nodes)` (403 "forbidden"),
//! k3s's authorizer (user `system:node:NAME`, client key NAME; 401 "failed
//! authentication"), then a rancher/remotedialer server session over the WebSocket.
//! Kubelet connections go through those sessions as [`K3sRouting`] says: `Agent` as
//! current k3s's egress selector and supervisor `dialBackend` (a node's kubelet address,
//! or a node name, through that node's session to `127.0.0.1:PORT`; no session is a
//! refused CONNECT, which the API server reports as a 500 "proxy error from ... code
//! 502"), `V121` as k3s v1.21's proxy dialer (Hostname first; a session named after the
//! host is used, else a direct dial). [`FakeApiServer::add_frontend`] adds another
//! server sharing the store, with its own sessions. Test hooks show and drive the
//! sessions (`tunnel_sessions`, `tunnel_log`, `tunnel_dial`, `tunnel_send_raw`,
//! `drop_tunnel_sessions`); `set_client_cert_ttl` is a test-only knob.
//!
//! RBAC ([`FakeApiServer::enforce_rbac`], off by default): resource requests authorized
//! with the stored RBAC objects as kube-apiserver's RBAC authorizer decides (request
//! attributes as its RequestInfoFactory makes them, including the name a list or watch
//! carries in `fieldSelector=metadata.name=NAME`), refused with its 403 Forbidden Status.
//!
//! Not a real API server: requests are not authenticated, and authorized only with
//! `enforce_rbac` (a bearer token, or in k3s mode a client certificate, names the
//! requester; an unknown credential is anonymous, not refused), no validation beyond unknown fields and the CSR
//! and review checks (no required fields, types or immutability elsewhere), no
//! server-side apply field ownership (apply is a merge), no protobuf bodies (so
//! `kubectl certificate approve` fails), no aggregated discovery, no /openapi/v2, no
//! OpenAPI v3 for the RBAC, certificates and review groups (kubectl's client-side
//! validation of those kinds fails: use `--validate=false` or kube-rs), no Tables for
//! kinds other than pods and events, no `pods/proxy`. Clients talk plain HTTP/1.1
//! ([`FakeApiServer::start`]) or HTTPS with HTTP/1.1 (k3s mode); the k3s supervisor's
//! other endpoints (`/v1-k3s/serving-kubelet.crt`, `/cacerts`, HTTP CONNECT, ...) are
//! not served, and an untrusted client certificate fails the TLS handshake where a Go
//! server would answer 401.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::{Filter, Reply as _};

mod kubelet_proxy;
pub mod pki;
mod tunnel;

pub use tunnel::{TunnelConn, TunnelMessage};

/// How many events a watch can resume from; older resourceVersions get 410.
const HISTORY: usize = 1000;

/// A fixed self-signed test certificate (no key). No longer published: each fake now
/// has its own cluster CA ([`FakeApiServer::cluster_ca_pem`]), which every namespace's
/// `kube-root-ca.crt` ConfigMap publishes.
pub const ROOT_CA_PEM: &str = include_str!("../fixtures/fake-root-ca.crt");
const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";
const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The API server's own audience and issuer (kubeadm's defaults).
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

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
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Resource {
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        kind: "NetworkPolicy",
        namespaced: true,
    },
    Resource {
        group: "",
        version: "v1",
        plural: "endpoints",
        kind: "Endpoints",
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
    Resource {
        group: "certificates.k8s.io",
        version: "v1",
        plural: "certificatesigningrequests",
        kind: "CertificateSigningRequest",
        namespaced: false,
    },
    Resource {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "tokenreviews",
        kind: "TokenReview",
        namespaced: false,
    },
    Resource {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "subjectaccessreviews",
        kind: "SubjectAccessReview",
        namespaced: false,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterroles",
        kind: "ClusterRole",
        namespaced: false,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "clusterrolebindings",
        kind: "ClusterRoleBinding",
        namespaced: false,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "roles",
        kind: "Role",
        namespaced: true,
    },
    Resource {
        group: "rbac.authorization.k8s.io",
        version: "v1",
        plural: "rolebindings",
        kind: "RoleBinding",
        namespaced: true,
    },
];

/// What an update through the status subresource keeps of `next`: a pod's everything
/// but its spec, deletionTimestamp and ownerReferences (the API server's pod status
/// strategy, so the kubelet's status patches may carry labels and annotations), other
/// kinds' status only.
fn status_update(resource: &Resource, stored: &Value, mut next: Value) -> Value {
    if resource.plural != "pods" {
        let mut kept = stored.clone();
        kept["status"] = next["status"].take();
        return kept;
    }
    next["spec"] = stored["spec"].clone();
    for field in ["deletionTimestamp", "ownerReferences"] {
        match stored["metadata"].get(field) {
            Some(value) => next["metadata"][field] = value.clone(),
            None => {
                if let Some(meta) = next["metadata"].as_object_mut() {
                    meta.remove(field);
                }
            }
        }
    }
    next
}

/// Create-only resources: nothing is stored, the answer is computed.
fn is_review(resource: &Resource) -> bool {
    matches!(resource.plural, "tokenreviews" | "subjectaccessreviews")
}

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
    /// Every resource request, oldest first.
    requests: Vec<RequestRecord>,
    /// The requests refused with 403 while RBAC was enforced, oldest first.
    refused: Vec<RequestRecord>,
    /// The watches being served, by a serial number.
    open_watches: BTreeMap<u64, OpenWatch>,
    watch_serial: u64,
    uid_counter: u64,
    tokens: Vec<IssuedToken>,
    /// Who each bearer token the fake knows authenticates as.
    token_users: BTreeMap<String, TokenUser>,
    pki: Arc<pki::Pki>,
    grants: u64,
    /// k3s mode, or None for the plain fake.
    mode: Option<K3sRouting>,
    /// Test-only: the lifetime of kubelet client certificates, overriding the signer's.
    client_cert_ttl: Option<i64>,
    /// Test-only: pod status writes are refused with 429, as API Priority and Fairness
    /// refuses requests of an overloaded server.
    throttle_pod_status: bool,
    /// Every resource request is authorized with the stored RBAC objects (see
    /// [`FakeApiServer::enforce_rbac`]).
    enforce_rbac: bool,
}

/// What TokenReview says of a token.
#[derive(Debug, Clone)]
struct TokenUser {
    username: String,
    uid: String,
    groups: Vec<String>,
    /// Empty: any audience (the static admin token).
    audiences: Vec<String>,
    /// Seconds since the epoch; 0 for never.
    expires: i64,
    extra: Map<String, Value>,
}

/// The kubeconfig's credential, a static token as in a `--token-auth-file`.
const ADMIN_TOKEN: &str = "fake-token";
const ADMIN_USER: &str = "kubernetes-admin";

/// A token the TokenRequest API handed out, as tests of the node check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to, if any.
    pub pod: Option<String>,
    pub expiration_seconds: i64,
    pub audiences: Vec<String>,
    /// Seconds since the Unix epoch.
    pub issued_at: i64,
}

/// The fake server; stops when dropped.
pub struct FakeApiServer {
    /// The first listener's address.
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    stop: CancellationToken,
    pki: Arc<pki::Pki>,
    /// k3s mode, or None for the plain fake.
    mode: Option<K3sRouting>,
    /// What agents sent on their tunnel sessions, all frontends.
    tunnel_log: Arc<tunnel::TunnelLog>,
    /// The listeners: the first, then those `add_frontend` added.
    frontends: Mutex<Vec<Arc<Frontend>>>,
    /// The runtime the fake was started on, where `add_frontend` starts its listener
    /// (tests may call it from a thread outside any runtime).
    runtime: tokio::runtime::Handle,
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
    if reason.is_empty() {
        // StatusReasonUnknown is the empty string, left out of the JSON.
        if let Some(map) = body.as_object_mut() {
            map.remove("reason");
        }
    }
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
    // The few labels that are not the field's path, as the API's field label
    // conversion functions map them.
    let value = |label: &str| match label {
        "source" => field(object, "source.component"),
        "spec.hostNetwork" if field(object, label).is_empty() => "false".to_string(),
        _ => field(object, label),
    };
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            value(k) != v
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            value(k) == v
        } else {
            false
        }
    })
}

/// The field labels each resource supports in a fieldSelector (the API's
/// AddFieldLabelConversionFunc registrations); others are a 400.
fn field_labels(resource: &Resource) -> &'static [&'static str] {
    match (resource.group, resource.plural) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        ],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "namespaces") => &["status.phase"],
        ("", "secrets") => &["type"],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        _ => &[],
    }
}

fn check_field_selector(
    resource: &Resource,
    params: &BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let Some(selector) = params.get("fieldSelector") else {
        return Ok(());
    };
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let label = term
            .split_once("!=")
            .or_else(|| term.split_once("=="))
            .or_else(|| term.split_once('='))
            .map(|(k, _)| k);
        let Some(label) = label else {
            return Err(status(
                400,
                "BadRequest",
                format!("invalid selector: '{selector}'; can't understand '{term}'"),
                None,
            ));
        };
        if !matches!(label, "metadata.name" | "metadata.namespace")
            && !field_labels(resource).contains(&label)
        {
            return Err(status(
                400,
                "BadRequest",
                format!("field label not supported: {label}"),
                None,
            ));
        }
    }
    Ok(())
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
        | "ephemeralContainers"
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
    fn new(pki: Arc<pki::Pki>, mode: Option<K3sRouting>) -> Store {
        let (events, _) = broadcast::channel(4096);
        let mut store = Store {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            events,
            requests: Vec::new(),
            open_watches: BTreeMap::new(),
            watch_serial: 0,
            refused: Vec::new(),
            uid_counter: 0,
            tokens: Vec::new(),
            token_users: BTreeMap::new(),
            pki,
            grants: 0,
            mode,
            client_cert_ttl: None,
            throttle_pod_status: false,
            enforce_rbac: false,
        };
        store.token_users.insert(
            ADMIN_TOKEN.to_string(),
            TokenUser {
                username: ADMIN_USER.to_string(),
                uid: ADMIN_USER.to_string(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
                audiences: vec![],
                expires: 0,
                extra: Map::new(),
            },
        );
        for ns in ["default", "kube-system", "kube-node-lease", "kube-public"] {
            let resource = Resource::find("", "v1", "namespaces").expect("namespaces");
            let _ = store.create(&resource, "", json!({"metadata": {"name": ns}}));
        }
        store.bootstrap();
        store
    }

    /// What a started control plane has: the authentication ConfigMap (as recorded from
    /// k3s, the client CA kubelets verify API clients with) and the RBAC objects the
    /// fake's own kubelet client identity relies on (bootstrap policy's
    /// `system:kubelet-api-admin`, bound to User kube-apiserver as k3s does) plus
    /// `cluster-admin` for `system:masters`, and bootstrap policy's two ClusterRoles the
    /// csrapproving controller checks (`...:nodeclient`, `...:selfnodeclient`; unbound).
    fn bootstrap(&mut self) {
        // The API server's own Service, which every cluster has (the master service
        // the kubelet gives every pod in its environment), at the range's first address.
        let services = Resource::find("", "v1", "services").expect("services");
        let _ = self.create(
            &services,
            "default",
            json!({
                "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": {
                    "clusterIP": "10.43.0.1",
                    "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}],
                },
            }),
        );
        let cm = Resource::find("", "v1", "configmaps").expect("configmaps");
        let client_ca = self.pki.client_ca_pem();
        let _ = self.create(
            &cm,
            "kube-system",
            json!({
                "metadata": {"name": "extension-apiserver-authentication"},
                "data": {
                    "client-ca-file": client_ca,
                    "requestheader-allowed-names": "[\"system:auth-proxy\"]",
                    "requestheader-client-ca-file": client_ca,
                    "requestheader-extra-headers-prefix": "[\"X-Remote-Extra-\"]",
                    "requestheader-group-headers": "[\"X-Remote-Group\"]",
                    "requestheader-username-headers": "[\"X-Remote-User\"]",
                },
            }),
        );
        let rbac =
            |plural| Resource::find("rbac.authorization.k8s.io", "v1", plural).expect("rbac");
        let bootstrap = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
        let _ = self.create(
            &rbac("clusterroles"),
            "",
            json!({
                "metadata": {"name": "cluster-admin", "labels": bootstrap},
                "rules": [
                    {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                    {"nonResourceURLs": ["*"], "verbs": ["*"]},
                ],
            }),
        );
        let _ = self.create(
            &rbac("clusterrolebindings"),
            "",
            json!({
                "metadata": {"name": "cluster-admin", "labels": bootstrap},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:masters"}],
            }),
        );
        let _ = self.create(
            &rbac("clusterroles"),
            "",
            json!({
                "metadata": {"name": "system:kubelet-api-admin", "labels": bootstrap},
                "rules": [
                    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["proxy"]},
                    {"apiGroups": [""], "resources": ["nodes/log", "nodes/metrics", "nodes/proxy", "nodes/stats"], "verbs": ["*"]},
                ],
            }),
        );
        // plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go.
        for which in ["nodeclient", "selfnodeclient"] {
            let _ = self.create(
                &rbac("clusterroles"),
                "",
                json!({
                    "metadata": {
                        "name": format!("system:certificates.k8s.io:certificatesigningrequests:{which}"),
                        "labels": bootstrap,
                        "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
                    },
                    "rules": [{
                        "apiGroups": ["certificates.k8s.io"],
                        "resources": [format!("certificatesigningrequests/{which}")],
                        "verbs": ["create"],
                    }],
                }),
            );
        }
        let _ = self.create(
            &rbac("clusterrolebindings"),
            "",
            json!({
                "metadata": {"name": "kube-apiserver-kubelet-admin"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:kubelet-api-admin"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kube-apiserver"}],
            }),
        );
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
        if resource.plural == "pods" && resource.group.is_empty() {
            // Admission sees the name as sent (empty for generateName).
            self.admit_pod(namespace, &name, &mut object)?;
        }
        let name = if name.is_empty() {
            match object["metadata"]["generateName"].as_str() {
                Some(prefix) => self.generate_name(resource, namespace, prefix),
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
        if resource.plural == "services" {
            let taken: BTreeSet<String> = self
                .objects
                .iter()
                .filter(|(key, _)| key.group.is_empty() && key.plural == "services")
                .filter_map(|(_, s)| s["spec"]["clusterIP"].as_str().map(str::to_owned))
                .collect();
            default_service(&mut object, &taken)?;
        }
        if resource.plural == "secrets" {
            fold_string_data(&mut object);
        }
        let stored = self.record("ADDED", key.clone(), object);
        if resource.plural == "pods" || resource.plural == "nodes" {
            self.schedule();
        }
        if Store::certificate_related(&key) {
            self.certificate_controllers();
        }
        if resource.plural == "namespaces" {
            self.namespace_controllers(&name);
        }
        Ok(stored)
    }

    /// What a real cluster's controllers put in every namespace soon after it is made:
    /// the ServiceAccount "default" (serviceaccount controller) and the ConfigMap
    /// "kube-root-ca.crt" (root-ca-cert-publisher). Here they come at once.
    fn namespace_controllers(&mut self, namespace: &str) {
        let sa = Resource::find("", "v1", "serviceaccounts").expect("serviceaccounts");
        let cm = Resource::find("", "v1", "configmaps").expect("configmaps");
        let _ = self.create(&sa, namespace, json!({"metadata": {"name": "default"}}));
        let _ = self.create(
            &cm,
            namespace,
            json!({
                "metadata": {
                    "name": ROOT_CA_CONFIGMAP,
                    "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}
                },
                "data": {"ca.crt": self.pki.cluster_ca_pem()},
            }),
        );
    }

    /// A name for `generateName`: the prefix and a random suffix, generated again while
    /// taken, up to 8 names in all, as the API server does since 1.32 (KEP-4420,
    /// `maxNameGenerationCreateAttempts`); the last one taken is refused by the caller.
    fn generate_name(&mut self, resource: &Resource, namespace: &str, prefix: &str) -> String {
        const ATTEMPTS: usize = 8;
        let mut name = String::new();
        for _ in 0..ATTEMPTS {
            name = format!("{prefix}{}", self.random_suffix());
            if !self
                .objects
                .contains_key(&Store::key(resource, namespace, &name))
            {
                break;
            }
        }
        name
    }

    /// Five characters as the API server's name generator picks them.
    fn random_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let seed = self.new_uid();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(seed.as_bytes());
        digest[..5]
            .iter()
            .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
            .collect()
    }

    /// The ServiceAccount admission plugin on pod create (plugin/pkg/admission/serviceaccount):
    /// default the service account, refuse one that does not exist, copy its
    /// imagePullSecrets, and mount a projected API token volume into every container.
    fn admit_pod(&mut self, namespace: &str, name: &str, pod: &mut Value) -> Result<(), ApiError> {
        // Mirror pods (static pods a kubelet reports) are left alone.
        if !pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null() {
            return Ok(());
        }
        let spec = &mut pod["spec"];
        // v1 conversion: the deprecated serviceAccount fills serviceAccountName.
        let mut sa_name = spec["serviceAccountName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if sa_name.is_empty() {
            sa_name = spec["serviceAccount"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        if sa_name.is_empty() {
            sa_name = "default".to_string();
        }
        spec["serviceAccountName"] = json!(sa_name);
        spec["serviceAccount"] = json!(sa_name);
        let sa_resource = Resource::find("", "v1", "serviceaccounts").expect("serviceaccounts");
        let Some(sa) = self
            .objects
            .get(&Store::key(&sa_resource, namespace, &sa_name))
            .cloned()
        else {
            return Err(status(
                403,
                "Forbidden",
                format!("pods \"{name}\" is forbidden: error looking up service account {namespace}/{sa_name}: serviceaccount \"{sa_name}\" not found"),
                Some((name, "pods")),
            ));
        };
        let spec = &mut pod["spec"];
        if spec["imagePullSecrets"]
            .as_array()
            .is_none_or(|list| list.is_empty())
        {
            if let Some(secrets) = sa["imagePullSecrets"].as_array().filter(|l| !l.is_empty()) {
                spec["imagePullSecrets"] = json!(secrets);
            }
        }
        let automount = spec["automountServiceAccountToken"]
            .as_bool()
            .or_else(|| sa["automountServiceAccountToken"].as_bool())
            .unwrap_or(true);
        if !automount {
            return Ok(());
        }
        let existing = spec["volumes"].as_array().and_then(|volumes| {
            volumes
                .iter()
                .filter_map(|v| v["name"].as_str())
                .find(|n| n.starts_with("kube-api-access-"))
                .map(str::to_string)
        });
        let volume_name = match &existing {
            Some(name) => name.clone(),
            None => format!("kube-api-access-{}", self.random_suffix()),
        };
        let spec = &mut pod["spec"];
        let mount = json!({"name": volume_name, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH});
        let mut needs_volume = false;
        for list in ["initContainers", "containers"] {
            let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
                continue;
            };
            for container in containers {
                let mounted = container["volumeMounts"].as_array().is_some_and(|mounts| {
                    mounts.iter().any(|m| m["mountPath"] == TOKEN_MOUNT_PATH)
                });
                if mounted {
                    continue;
                }
                if !container["volumeMounts"].is_array() {
                    container["volumeMounts"] = json!([]);
                }
                if let Some(mounts) = container["volumeMounts"].as_array_mut() {
                    mounts.push(mount.clone());
                }
                needs_volume = true;
            }
        }
        if existing.is_none() && needs_volume {
            if !spec["volumes"].is_array() {
                spec["volumes"] = json!([]);
            }
            if let Some(volumes) = spec["volumes"].as_array_mut() {
                volumes.push(json!({
                    "name": volume_name,
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": ROOT_CA_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
                        ],
                        "defaultMode": 420
                    }
                }));
            }
        }
        Ok(())
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

/// What the API server fills into a new Service: a ClusterIP from the service range
/// (k3s' default, 10.43.0.0/16; `None` stays, for a headless Service), its type and
/// session affinity, each port's protocol and, unset, its targetPort (the port).
fn default_service(service: &mut Value, taken: &BTreeSet<String>) -> Result<(), ApiError> {
    let spec = &mut service["spec"];
    for (k, v) in [
        ("type", json!("ClusterIP")),
        ("sessionAffinity", json!("None")),
        ("internalTrafficPolicy", json!("Cluster")),
        ("ipFamilies", json!(["IPv4"])),
        ("ipFamilyPolicy", json!("SingleStack")),
    ] {
        if spec[k].is_null() {
            spec[k] = v;
        }
    }
    if spec["clusterIP"].is_null() {
        // 10.43.0.1 is the kubernetes Service's.
        let ip = (2..=u16::MAX)
            .map(|n| format!("10.43.{}.{}", n >> 8, n & 0xff))
            .find(|ip| !taken.contains(ip))
            .ok_or_else(|| {
                status(
                    500,
                    "InternalError",
                    "the service range is full".into(),
                    None,
                )
            })?;
        spec["clusterIP"] = json!(ip);
    }
    spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
    for port in spec["ports"].as_array_mut().into_iter().flatten() {
        if port["protocol"].is_null() {
            port["protocol"] = json!("TCP");
        }
        if port["targetPort"].is_null() {
            port["targetPort"] = port["port"].clone();
        }
    }
    Ok(())
}

/// The defaults the API server fills into a new pod.
fn default_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("schedulerName", json!("default-scheduler")),
        ("enableServiceLinks", json!(true)),
        ("securityContext", json!({})),
        ("priority", json!(0)),
        ("preemptionPolicy", json!("PreemptLowerPriority")),
    ] {
        if spec[k].is_null() {
            spec[k] = v;
        }
    }
    for list in ["initContainers", "containers"] {
        if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
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
    // The DefaultTolerationSeconds admission plugin: tolerate not-ready and
    // unreachable nodes for 300 s unless the pod says otherwise.
    for taint in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let tolerated = spec["tolerations"].as_array().is_some_and(|list| {
            list.iter().any(|t| {
                (t["key"] == taint || t["key"].as_str().is_none_or(str::is_empty))
                    && (t["effect"] == "NoExecute"
                        || t["effect"].as_str().is_none_or(str::is_empty))
            })
        });
        if !tolerated {
            if !spec["tolerations"].is_array() {
                spec["tolerations"] = json!([]);
            }
            if let Some(list) = spec["tolerations"].as_array_mut() {
                list.push(json!({"key": taint, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
            }
        }
    }
    if pod["status"].is_null() {
        pod["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
    }
}

/// A parsed request path.
/// One resource request, as RBAC sees it: who asked (the User-Agent), the verb, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub user_agent: String,
    pub verb: &'static str,
    pub group: &'static str,
    /// `pods`, or `pods/status` for a subresource.
    pub resource: String,
    pub namespace: String,
    /// The object's name; empty for lists and creates.
    pub name: String,
    /// A list's or watch's `fieldSelector`, as sent; empty if none.
    pub field_selector: String,
}

impl RequestRecord {
    fn new(
        method: &warp::http::Method,
        target: &Target,
        params: &BTreeMap<String, String>,
        user_agent: String,
    ) -> RequestRecord {
        let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
        let verb = match (method.as_str(), target.name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => "unknown",
        };
        let resource = match &target.subresource {
            Some(sub) => format!("{}/{sub}", target.resource.plural),
            None => target.resource.plural.to_string(),
        };
        RequestRecord {
            user_agent,
            verb,
            group: target.resource.group,
            resource,
            namespace: target.namespace.clone(),
            name: target.name.clone().unwrap_or_default(),
            field_selector: params.get("fieldSelector").cloned().unwrap_or_default(),
        }
    }
}

/// A watch the fake is serving: open until its client goes away or it times out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenWatch {
    pub user_agent: String,
    /// The plural, e.g. `configmaps`.
    pub resource: String,
    /// Empty for a watch across all namespaces.
    pub namespace: String,
    pub field_selector: String,
}

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
                let verbs = if is_review(r) {
                    json!(["create"])
                } else {
                    json!(["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"])
                };
                let mut entry = json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs});
                let short = match (r.group, r.plural) {
                    ("", "pods") => Some("po"),
                    ("", "nodes") => Some("no"),
                    ("", "namespaces") => Some("ns"),
                    ("", "configmaps") => Some("cm"),
                    ("", "serviceaccounts") => Some("sa"),
                    ("", "services") => Some("svc"),
                    ("", "events") | ("events.k8s.io", "events") => Some("ev"),
                    ("certificates.k8s.io", _) => Some("csr"),
                    _ => None,
                };
                if let Some(short) = short {
                    entry["shortNames"] = json!([short]);
                }
                if r.plural == "pods" {
                    entry["categories"] = json!(["all"]);
                }
                let mut out = vec![entry];
                if matches!(r.plural, "pods" | "nodes") && r.group.is_empty() {
                    out.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
                }
                if r.plural == "pods" && r.group.is_empty() {
                    out.push(json!({"name": format!("pods/{EPHEMERAL_CONTAINERS}"), "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get", "patch", "update"]}));
                }
                if r.plural == "certificatesigningrequests" {
                    for sub in ["approval", "status"] {
                        out.push(json!({"name": format!("{}/{sub}", r.plural), "singularName": "", "namespaced": false, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
                    }
                }
                if r.group.is_empty() && r.plural == "pods" {
                    // The connect subresources the API server proxies to kubelets.
                    for (sub, kind, verbs) in [
                        ("attach", "PodAttachOptions", json!(["create", "get"])),
                        ("exec", "PodExecOptions", json!(["create", "get"])),
                        ("log", "Pod", json!(["get"])),
                        ("portforward", "PodPortForwardOptions", json!(["create", "get"])),
                    ] {
                        out.push(json!({"name": format!("pods/{sub}"), "singularName": "", "namespaced": true, "kind": kind, "verbs": verbs}));
                    }
                }
                if r.plural == "serviceaccounts" {
                    // The TokenRequest subresource, as the real /api/v1 lists it.
                    out.push(json!({"name": "serviceaccounts/token", "singularName": "", "namespaced": true, "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"]}));
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
            let mut names: Vec<&str> = vec![];
            for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
                if !names.contains(&r.group) {
                    names.push(r.group);
                }
            }
            let groups: Vec<Value> = names
                .iter()
                .map(|g| json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}}))
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        _ => {
            let group = path
                .strip_prefix("/apis/")
                .and_then(|rest| rest.strip_suffix("/v1"))?;
            let group = RESOURCES.iter().find(|r| r.group == group)?.group;
            resources(group, "v1")
        }
    })
}

/// One listener: the plain fake's, or one k3s server of the control plane (HTTPS, with
/// its own tunnel server).
pub(crate) struct Frontend {
    addr: SocketAddr,
    mode: Option<K3sRouting>,
    tunnel: Arc<tunnel::TunnelServer>,
}

/// Who a verified client certificate authenticates as.
#[derive(Debug, Clone)]
struct ClientIdentity {
    user: String,
    groups: Vec<String>,
}

/// The API itself, as warp filters.
fn api_filter(
    store: Arc<Mutex<Store>>,
) -> impl Filter<Extract = (Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::header::optional::<String>("accept"))
        .and(warp::header::optional::<String>("user-agent"))
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::ext::optional::<ClientIdentity>())
        .and(warp::body::bytes())
        .then(
            move |method: warp::http::Method,
                  path: warp::path::FullPath,
                  query: String,
                  content_type: Option<String>,
                  accept: Option<String>,
                  user_agent: Option<String>,
                  authorization: Option<String>,
                  identity: Option<ClientIdentity>,
                  body: warp::hyper::body::Bytes| {
                let store = store.clone();
                async move {
                    let request = Request {
                        method,
                        path: path.as_str().to_string(),
                        query,
                        content_type,
                        accept,
                        user_agent: user_agent.unwrap_or_default(),
                        bearer: authorization
                            .as_deref()
                            .and_then(|a| a.strip_prefix("Bearer "))
                            .map(|t| t.trim().to_string()),
                        identity,
                        body: body.to_vec(),
                    };
                    let mut warnings = vec![];
                    let mut reply =
                        route(store, request, &mut warnings).unwrap_or_else(ApiError::reply);
                    for warning in warnings {
                        // RFC 7234 warn-code 299, the text quoted.
                        let text = format!(
                            "299 - \"{}\"",
                            warning.replace('\\', "\\\\").replace('"', "\\\"")
                        );
                        if let Ok(value) = warp::http::HeaderValue::from_str(&text) {
                            reply.headers_mut().append("warning", value);
                        }
                    }
                    reply
                }
            },
        )
}

/// Starts serving one listener until `stop`.
fn spawn_frontend(
    listener: tokio::net::TcpListener,
    store: &Arc<Mutex<Store>>,
    pki: &Arc<pki::Pki>,
    mode: Option<K3sRouting>,
    log: &Arc<tunnel::TunnelLog>,
    stop: &CancellationToken,
) -> Arc<Frontend> {
    let addr = listener.local_addr().expect("addr");
    let frontend = Arc::new(Frontend {
        addr,
        mode,
        tunnel: Arc::new(tunnel::TunnelServer::new(log.clone())),
    });
    let service =
        hyper_util::service::TowerToHyperService::new(warp::service(api_filter(store.clone())));
    let tls = mode.map(|_| tokio_rustls::TlsAcceptor::from(pki.server_config()));
    let until = stop.clone();
    let store = store.clone();
    let kubelet_tls = pki.kubelet_tls.clone();
    let serving = frontend.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = until.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(_) => continue,
                },
            };
            // Go's net package sets TCP_NODELAY on every connection.
            let _ = tcp.set_nodelay(true);
            let connection = Connection {
                service: service.clone(),
                store: store.clone(),
                kubelet_tls: kubelet_tls.clone(),
                frontend: serving.clone(),
                peer,
                identity: None,
                stop: until.clone(),
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => connection.serve(tcp).await,
                    Some(acceptor) => {
                        let Ok(Ok(stream)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                                .await
                        else {
                            return;
                        };
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|der| pki::certificate_user(der))
                            .map(|(user, groups)| ClientIdentity { user, groups });
                        Connection {
                            identity,
                            ..connection
                        }
                        .serve(stream)
                        .await
                    }
                }
            });
        }
    });
    frontend
}

/// One client connection to a frontend.
struct Connection<S> {
    service: S,
    store: Arc<Mutex<Store>>,
    kubelet_tls: Arc<rustls::ClientConfig>,
    frontend: Arc<Frontend>,
    peer: SocketAddr,
    identity: Option<ClientIdentity>,
    stop: CancellationToken,
}

impl<S> Connection<S>
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = Reply,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    /// hyper serves warp's filters, the agent tunnel, and the pod subresources that are
    /// proxied to kubelets (which need the raw request to pass an upgrade through).
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            service,
            store,
            kubelet_tls,
            frontend,
            peer,
            identity,
            stop,
        } = self;
        let until = stop.clone();
        let handler = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                let service = service.clone();
                let store = store.clone();
                let tls = kubelet_tls.clone();
                let frontend = frontend.clone();
                let identity = identity.clone();
                let stop = stop.clone();
                async move {
                    if let Some(identity) = &identity {
                        request.extensions_mut().insert(identity.clone());
                    }
                    if frontend.mode.is_some() && request.uri().path() == "/v1-k3s/connect" {
                        return Ok(tunnel_connect(&store, &frontend, identity, request, stop));
                    }
                    if frontend.mode.is_some() && request.uri().path() == "/ping" {
                        // k3s's supervisor answers before any authentication (router.go).
                        let mut reply = warp::reply::Response::new("pong".into());
                        reply.headers_mut().insert(
                            warp::http::header::CONTENT_TYPE,
                            warp::http::HeaderValue::from_static("text/plain"),
                        );
                        return Ok(reply);
                    }
                    match kubelet_proxy::connect_target(request.uri().path()) {
                        Some(target) => Ok::<_, std::convert::Infallible>(
                            kubelet_proxy::handle(store, tls, frontend, request, peer, target)
                                .await,
                        ),
                        None => hyper::service::Service::call(&service, request).await,
                    }
                }
            },
        );
        let connection = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(io), handler)
            .with_upgrades();
        tokio::select! {
            _ = connection => {}
            _ = until.cancelled() => {}
        }
    }
}

/// How a k3s server routes the API server's connections to kubelets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum K3sRouting {
    /// Current k3s (v1.33, `--egress-selector-mode=agent`): the API server dials kubelets
    /// through the supervisor's HTTP CONNECT proxy (`dialBackend`), which uses an agent's
    /// tunnel session for a node's kubelet.
    Agent,
    /// k3s v1.21: the API server's proxy dialer uses a tunnel session whose client key is
    /// the host it dials (the address chosen Hostname first), else dials directly.
    V121,
}

/// An error from the k3s supervisor or its tunnel server: current k3s sends a Status
/// (`util.SendError`, with `Connection: close`); v1.21 sent remotedialer's
/// `DefaultErrorWriter` text, and its auth middleware only a status code.
fn supervisor_error(mode: K3sRouting, code: u16, message: &str) -> Reply {
    match mode {
        K3sRouting::Agent => {
            let reason = match code {
                400 => "BadRequest",
                401 => "Unauthorized",
                403 => "Forbidden",
                405 => "MethodNotAllowed",
                _ => "InternalError",
            };
            let mut reply = status(code, reason, message.to_string(), None).reply();
            reply.headers_mut().insert(
                warp::http::header::CONNECTION,
                warp::http::HeaderValue::from_static("close"),
            );
            reply
        }
        K3sRouting::V121 => {
            let body = if code == 403 {
                String::new()
            } else {
                message.to_string()
            };
            let mut reply = warp::reply::Response::new(body.into());
            *reply.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if code != 403 {
                reply.headers_mut().insert(
                    warp::http::header::CONTENT_TYPE,
                    warp::http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
            }
            reply
        }
    }
}

/// `GET /v1-k3s/connect` on a k3s server: the supervisor's router sends it through
/// `auth.HasRole(system:nodes)` (403 "forbidden" for anyone else, unauthenticated
/// included), then to remotedialer's `Server.ServeHTTP`: k3s's `authorizer` accepts
/// users named `system:node:NAME` with client key NAME (401 "failed authentication"
/// otherwise), gorilla's upgrader checks the handshake, and the WebSocket becomes a
/// server session for that key.
fn tunnel_connect(
    store: &Arc<Mutex<Store>>,
    frontend: &Arc<Frontend>,
    identity: Option<ClientIdentity>,
    mut request: hyper::Request<hyper::body::Incoming>,
    stop: CancellationToken,
) -> Reply {
    let mode = frontend.mode.unwrap_or(K3sRouting::Agent);
    // The supervisor's authenticator: the client certificate, else a bearer token.
    let user = identity.map(|i| (i.user, i.groups)).or_else(|| {
        let bearer = request
            .headers()
            .get(warp::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string())?;
        let store = store.lock().expect("store");
        store
            .token_users
            .get(&bearer)
            .map(|u| (u.username.clone(), u.groups.clone()))
    });
    let Some((name, _)) = user.filter(|(_, groups)| groups.iter().any(|g| g == "system:nodes"))
    else {
        return supervisor_error(mode, 403, "forbidden");
    };
    let Some(node) = name.strip_prefix("system:node:").map(str::to_string) else {
        return supervisor_error(mode, 401, "failed authentication");
    };
    // gorilla/websocket Upgrader.Upgrade, in its order.
    let headers = request.headers();
    let has_token = |name: warp::http::header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    const NOT_WEBSOCKET: &str = "websocket: the client is not using the websocket protocol: ";
    if !has_token(warp::http::header::CONNECTION, "upgrade") {
        return supervisor_error(
            mode,
            400,
            &format!("{NOT_WEBSOCKET}'upgrade' token not found in 'Connection' header"),
        );
    }
    if !has_token(warp::http::header::UPGRADE, "websocket") {
        return supervisor_error(
            mode,
            400,
            &format!("{NOT_WEBSOCKET}'websocket' token not found in 'Upgrade' header"),
        );
    }
    if request.method() != warp::http::Method::GET {
        return supervisor_error(
            mode,
            405,
            &format!("{NOT_WEBSOCKET}request method is not GET"),
        );
    }
    if !has_token(warp::http::header::SEC_WEBSOCKET_VERSION, "13") {
        return supervisor_error(
            mode,
            400,
            "websocket: unsupported version: 13 not found in 'Sec-Websocket-Version' header",
        );
    }
    let key = headers
        .get(warp::http::header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| pki::base64_decode(k).is_some_and(|b| b.len() == 16))
        .map(str::to_string);
    let Some(key) = key else {
        return supervisor_error(
            mode,
            400,
            "websocket: not a websocket handshake: 'Sec-WebSocket-Key' header must be Base64 encoded value of 16-byte length",
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut request);
    let tunnel = frontend.tunnel.clone();
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            tunnel
                .serve(node, hyper_util::rt::TokioIo::new(upgraded), stop)
                .await;
        }
    });
    let mut reply = warp::reply::Response::new(String::new().into());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = reply.headers_mut();
    headers.insert(
        warp::http::header::UPGRADE,
        warp::http::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        warp::http::header::CONNECTION,
        warp::http::HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        warp::http::header::SEC_WEBSOCKET_ACCEPT,
        warp::http::HeaderValue::from_str(&accept).expect("accept key"),
    );
    reply
}

/// What `/version` answers on a k3s server. Only the fields the fake knows for sure are
/// filled; commit and build date stay empty.
fn k3s_version(mode: K3sRouting) -> Value {
    let (minor, git_version) = match mode {
        K3sRouting::Agent => ("33", "v1.33.4+k3s1"),
        K3sRouting::V121 => ("21", "v1.21.2+k3s1"),
    };
    json!({
        "major": "1",
        "minor": minor,
        "gitVersion": git_version,
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

impl FakeApiServer {
    /// The fake as a plain HTTP API server (no TLS, no tunnel).
    pub async fn start() -> FakeApiServer {
        FakeApiServer::launch(None).await
    }

    /// The fake as a k3s server: HTTPS (a serving certificate for 127.0.0.1 and localhost
    /// from the cluster CA; client certificates optional, verified against the client CA
    /// when offered), the agent tunnel at `/v1-k3s/connect`, kubelet requests routed
    /// through agents' tunnel sessions as `mode` says, a k3s `/version`, and the
    /// `default/kubernetes` Endpoints naming this listener.
    pub async fn start_k3s(mode: K3sRouting) -> FakeApiServer {
        FakeApiServer::launch(Some(mode)).await
    }

    async fn launch(mode: Option<K3sRouting>) -> FakeApiServer {
        let pki = Arc::new(pki::Pki::new());
        let store = Arc::new(Mutex::new(Store::new(pki.clone(), mode)));
        let stop = CancellationToken::new();
        let log = Arc::new(tunnel::TunnelLog::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let frontend = spawn_frontend(listener, &store, &pki, mode, &log, &stop);
        if mode.is_some() {
            store
                .lock()
                .expect("store")
                .add_api_endpoint(frontend.addr.port());
        }
        FakeApiServer {
            addr: frontend.addr,
            store,
            stop,
            pki,
            mode,
            tunnel_log: log,
            frontends: Mutex::new(vec![frontend]),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// k3s mode only: another server of an HA control plane. A second HTTPS listener
    /// sharing this one's store but with its own tunnel server (a kubelet request
    /// arriving here dials through the sessions agents opened here); its address is
    /// added to the `default/kubernetes` Endpoints. Returns its URL.
    pub fn add_frontend(&self) -> String {
        assert!(self.mode.is_some(), "add_frontend: k3s mode only");
        let _runtime = self.runtime.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let frontend = spawn_frontend(
            listener,
            &self.store,
            &self.pki,
            self.mode,
            &self.tunnel_log,
            &self.stop,
        );
        self.store
            .lock()
            .expect("store")
            .add_api_endpoint(frontend.addr.port());
        let url = format!("https://{}", frontend.addr);
        self.frontends.lock().expect("frontends").push(frontend);
        url
    }

    fn frontends(&self) -> Vec<Arc<Frontend>> {
        self.frontends.lock().expect("frontends").clone()
    }

    /// Test hook: the live tunnel sessions of `node` (the client key, the node name),
    /// over all frontends.
    pub fn tunnel_sessions(&self, node: &str) -> usize {
        self.frontends().iter().map(|f| f.tunnel.count(node)).sum()
    }

    /// Test hook: ends every tunnel session on every frontend abruptly, as a server
    /// crash does: the TCP connections close, no WebSocket close frame is sent.
    pub fn drop_tunnel_sessions(&self) {
        for frontend in self.frontends() {
            frontend.tunnel.drop_all();
        }
    }

    /// Test hook: a connection to `tcp/<address>` through the node's first session (on
    /// the first frontend that has one), as the server's tunnel dialer opens it.
    pub async fn tunnel_dial(&self, node: &str, address: &str) -> Result<TunnelConn, String> {
        for frontend in self.frontends() {
            if frontend.tunnel.first(node).is_some() {
                return frontend.tunnel.dial(node, "tcp", address).await;
            }
        }
        Err(format!("failed to find Session for client {node}"))
    }

    /// Test hook: sends one raw binary WebSocket message on the node's first session.
    pub async fn tunnel_send_raw(&self, node: &str, frame: Vec<u8>) -> Result<(), String> {
        for frontend in self.frontends() {
            if frontend.tunnel.first(node).is_some() {
                return frontend.tunnel.send_raw(node, frame).await;
            }
        }
        Err(format!("failed to find Session for client {node}"))
    }

    /// Test hook: every message the server received on the node's sessions (all
    /// frontends), decoded, oldest first; the last [`tunnel::LOG_LIMIT`] are kept.
    pub fn tunnel_log(&self, node: &str) -> Vec<TunnelMessage> {
        self.tunnel_log.of(node)
    }

    /// Test-only knob, not a real API server setting: the lifetime (seconds) of the
    /// certificates the `kubernetes.io/kube-apiserver-client-kubelet` signer issues from
    /// now on, whatever `expirationSeconds` asks (a real signer never goes below 10
    /// minutes; this lets tests see short-lived client certificates expire). `None`
    /// restores the real rule.
    pub fn set_client_cert_ttl(&self, seconds: Option<i64>) {
        self.store.lock().expect("store").client_cert_ttl = seconds;
    }

    /// The cluster CA (PEM): what signs kubelet serving certificates (the
    /// `kubernetes.io/kubelet-serving` signer), what the fake verifies kubelets with, and
    /// what every namespace's `kube-root-ca.crt` publishes.
    pub fn cluster_ca_pem(&self) -> String {
        self.pki.cluster_ca_pem()
    }

    /// The client CA (PEM) published as `client-ca-file` in
    /// kube-system/extension-apiserver-authentication: what a kubelet verifies client
    /// certificates with.
    pub fn client_ca_pem(&self) -> String {
        self.pki.client_ca_pem()
    }

    /// A client certificate signed by the client CA, with CN `cn` and one O per group:
    /// (certificate PEM, PKCS#8 key PEM). The fake's own kubelet client is CN=kube-apiserver.
    pub fn client_cert(&self, cn: &str, groups: &[&str]) -> (String, String) {
        self.pki.client_cert(cn, groups)
    }

    /// Grants `user` one verb on one resource (`subresource` empty for none) in every API
    /// group and namespace, as a ClusterRole and ClusterRoleBinding named `fake-grant-N`,
    /// which SubjectAccessReview then names as the reason. Tests can as well create their
    /// own (Cluster)Roles and (Cluster)RoleBindings through the API.
    pub fn grant(&self, user: &str, verb: &str, resource: &str, subresource: &str) {
        let mut store = self.store.lock().expect("store");
        store.grants += 1;
        let name = format!("fake-grant-{}", store.grants);
        let resource = if subresource.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}/{subresource}")
        };
        let rbac =
            |plural| Resource::find("rbac.authorization.k8s.io", "v1", plural).expect("rbac");
        let _ = store.create(
            &rbac("clusterroles"),
            "",
            json!({"metadata": {"name": name}, "rules": [{"apiGroups": ["*"], "resources": [resource], "verbs": [verb]}]}),
        );
        let _ = store.create(
            &rbac("clusterrolebindings"),
            "",
            json!({
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
            }),
        );
    }

    /// `http://` for the plain fake, `https://` in k3s mode.
    pub fn url(&self) -> String {
        match self.mode {
            None => format!("http://{}", self.addr),
            Some(_) => format!("https://{}", self.addr),
        }
    }

    /// Writes a kubeconfig pointing at this server and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        // k3s mode: the cluster CA, so kubectl and kube-rs trust the serving certificate.
        let ca = match self.mode {
            None => String::new(),
            Some(_) => format!(
                ", certificate-authority-data: \"{}\"",
                pki::base64_encode(self.cluster_ca_pem().as_bytes())
            ),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"{ca}}}\nusers:\n- name: tester\n  user: {{token: fake-token}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: tester, namespace: default}}\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// While set, every write of a pod's status gets 429 TooManyRequests (with
    /// Retry-After: 1), as an overloaded API server's flow control answers.
    pub fn throttle_pod_status(&self, throttle: bool) {
        self.store.lock().expect("store").throttle_pod_status = throttle;
    }

    /// From now on every resource request is authorized as kube-apiserver's RBAC
    /// authorizer does, with the stored (Cluster)Roles and (Cluster)RoleBindings, and
    /// refused with 403 Forbidden in the API's Status shape (`system:masters`, as the
    /// admin kubeconfig's user, is always allowed). Off by default.
    pub fn enforce_rbac(&self) {
        self.store.lock().expect("store").enforce_rbac = true;
    }

    /// The requests RBAC refused (see [`FakeApiServer::enforce_rbac`]), oldest first.
    pub fn refused(&self) -> Vec<RequestRecord> {
        self.store.lock().expect("store").refused.clone()
    }

    /// Ends every open watch, as an API server restart does.
    pub fn drop_watches(&self) {
        let mut store = self.store.lock().expect("store");
        store.events = broadcast::channel(4096).0;
    }

    /// The resource requests served so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.store.lock().expect("store").requests.clone()
    }

    /// The watches being served now (a watch ends when its client closes it, when its
    /// `timeoutSeconds` pass, or with [`FakeApiServer::drop_watches`]).
    pub fn open_watches(&self) -> Vec<OpenWatch> {
        self.store
            .lock()
            .expect("store")
            .open_watches
            .values()
            .cloned()
            .collect()
    }

    /// Drops the history a watch could resume from (what etcd compaction does). After
    /// `compact()`, the clients' next watch from their old resourceVersion gets 410
    /// Expired.
    pub fn compact(&self) {
        let mut store = self.store.lock().expect("store");
        store.history.clear();
    }

    /// The tokens the TokenRequest API issued, oldest first.
    pub fn tokens_issued(&self) -> Vec<IssuedToken> {
        self.store.lock().expect("store").tokens.clone()
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

struct Request {
    method: warp::http::Method,
    path: String,
    query: String,
    content_type: Option<String>,
    accept: Option<String>,
    user_agent: String,
    /// The bearer token sent, if any.
    bearer: Option<String>,
    /// The verified client certificate's user (k3s mode), if any.
    identity: Option<ClientIdentity>,
    body: Vec<u8>,
}

fn route(
    store: Arc<Mutex<Store>>,
    request: Request,
    warnings: &mut Vec<String>,
) -> Result<Reply, ApiError> {
    let Request {
        method,
        path,
        query,
        content_type,
        accept,
        user_agent,
        bearer,
        identity,
        body,
    } = request;
    if method == warp::http::Method::GET {
        let mode = store.lock().expect("store").mode;
        if let (Some(mode), "/version") = (mode, path.trim_end_matches('/')) {
            return Ok(reply_json(200, &k3s_version(mode)));
        }
        if let Some(doc) = discovery(&path) {
            return Ok(reply_json(200, &doc));
        }
        if let Some(reply) = openapi(&path) {
            return Ok(reply);
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
    if let Ok(mut store) = store.lock() {
        store.requests.push(RequestRecord::new(
            &method,
            &target,
            &params,
            user_agent.clone(),
        ));
        if store.enforce_rbac {
            let requester = store.requester(identity.as_ref(), bearer.as_deref());
            let attrs = request_attributes(&method, &target, &params, &requester);
            if !store.authorize(&attrs).0 {
                if let Some(record) = store.requests.last().cloned() {
                    store.refused.push(record);
                }
                return Err(forbidden(&attrs));
            }
        }
    }
    let throttled = target.resource.plural == "pods"
        && target.subresource.as_deref() == Some("status")
        && method != warp::http::Method::GET
        && store.lock().is_ok_and(|s| s.throttle_pod_status);
    if throttled {
        let mut error = status(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.".into(),
            None,
        );
        error.body["details"] = json!({ "retryAfterSeconds": 1 });
        return Err(error);
    }
    let validation = FieldValidation::from_params(&params)?;
    if is_review(&target.resource) {
        if method != warp::http::Method::POST || target.name.is_some() {
            return Err(status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource".into(),
                None,
            ));
        }
        let review = serde_json::from_slice::<Value>(&body)
            .map_err(|e| status(400, "BadRequest", format!("invalid body: {e}"), None))?;
        let store = store.lock().expect("store");
        return if target.resource.plural == "tokenreviews" {
            token_review(&store, review)
        } else {
            subject_access_review(&store, review)
        };
    }
    if target.resource.plural == "certificatesigningrequests"
        && method == warp::http::Method::POST
        && target.name.is_none()
    {
        let mut object = serde_json::from_slice::<Value>(&body)
            .map_err(|e| status(400, "BadRequest", format!("invalid body: {e}"), None))?;
        let kind = target.resource.kind;
        validation.check(&target.resource, &mut object, warnings, |e| {
            format!("{kind} in version \"v1\" cannot be handled as a {kind}: {e}")
        })?;
        let mut store = store.lock().expect("store");
        let requester = store.requester(identity.as_ref(), bearer.as_deref());
        csr_prepare_create(&mut object, &requester)?;
        let created = store.create(&target.resource, "", object)?;
        return Ok(reply_json(201, &created));
    }
    let resource = target.resource;
    let kind = resource.kind;
    let version = resource.version;
    let decode_error = move |e: String| {
        format!("{kind} in version \"{version}\" cannot be handled as a {kind}: {e}")
    };
    let parse_body = || -> Result<Value, ApiError> {
        let text = String::from_utf8_lossy(&body);
        // Apply patches may be YAML; JSON is YAML.
        serde_yaml::from_str::<Value>(&text)
            .map_err(|e| status(400, "BadRequest", format!("invalid body: {e}"), None))
    };
    match (method.as_str(), &target.name) {
        ("GET", None) if params.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            check_field_selector(&resource, &params)?;
            Ok(watch(store, target, params, user_agent))
        }
        ("GET", None) => {
            check_field_selector(&resource, &params)?;
            let list = list(&store, &target, &params);
            Ok(match table_wanted(&resource, accept.as_deref()) {
                true => reply_json(200, &table(&resource, &list, &params)),
                false => reply_json(200, &list),
            })
        }
        ("GET", Some(name)) => {
            let store = store.lock().expect("store");
            match store
                .objects
                .get(&Store::key(&target.resource, &target.namespace, name))
            {
                Some(object) if table_wanted(&resource, accept.as_deref()) => {
                    let list = json!({"metadata": {"resourceVersion": object["metadata"]["resourceVersion"]}, "items": [object]});
                    Ok(reply_json(200, &table(&resource, &list, &params)))
                }
                Some(object) => Ok(reply_json(200, object)),
                None => Err(not_found(&target.resource, name)),
            }
        }
        ("POST", Some(name))
            if target.subresource.as_deref() == Some("token")
                && target.resource.plural == "serviceaccounts" =>
        {
            token_request(&store, &target.namespace, name, parse_body()?)
        }
        ("POST", _) if target.subresource.is_none() => {
            let mut object = parse_body()?;
            validation.check(&resource, &mut object, warnings, decode_error)?;
            let mut store = store.lock().expect("store");
            let created = store.create(&target.resource, &target.namespace, object)?;
            Ok(reply_json(201, &created))
        }
        ("PUT", Some(name)) => {
            let mut object = parse_body()?;
            validation.check(&resource, &mut object, warnings, decode_error)?;
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
                    status_update(&target.resource, stored, object.clone())
                } else if target.subresource.as_deref() == Some("approval") {
                    let mut next = stored.clone();
                    next["status"]["conditions"] = object["status"]["conditions"].clone();
                    next
                } else if target.subresource.as_deref() == Some(EPHEMERAL_CONTAINERS) {
                    let mut next = stored.clone();
                    next["spec"]["ephemeralContainers"] =
                        object["spec"]["ephemeralContainers"].clone();
                    check_ephemeral_containers(stored, &next, name)?;
                    next
                } else {
                    let mut next = object.clone();
                    if object["status"].is_null() {
                        keep_stored_status(&mut next, stored);
                    }
                    next
                })
            })
        }
        ("PATCH", Some(name)) => {
            let patch = parse_body()?;
            let kind = content_type.unwrap_or_default();
            if kind.starts_with("application/apply-patch+yaml") {
                check_apply(&resource, &target.namespace, name, &patch)?;
            }
            update(&store, &target, name, |stored| {
                // A uid in the patch is a precondition (the status writer's guard
                // against a new pod of the same name).
                if let (Some(wanted), Some(found)) = (
                    patch["metadata"]["uid"].as_str(),
                    stored["metadata"]["uid"].as_str(),
                ) {
                    if wanted != found {
                        return Err(status(409, "Conflict", format!("Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {wanted}, UID in object meta: {found}", target.resource.plural), Some((name, target.resource.plural))));
                    }
                }
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
                    apply(&mut next, &patch)?;
                    next = status_update(&target.resource, stored, next);
                } else if target.subresource.as_deref() == Some("approval") {
                    // Only the conditions change through the approval subresource.
                    let mut status_patch = json!({"status": {}});
                    status_patch["status"]["conditions"] = patch["status"]["conditions"].clone();
                    apply(&mut next, &status_patch)?;
                } else if target.subresource.as_deref() == Some(EPHEMERAL_CONTAINERS) {
                    // Only the ephemeral containers change through their subresource.
                    let mut spec_patch = json!({"spec": {}});
                    spec_patch["spec"]["ephemeralContainers"] =
                        patch["spec"]["ephemeralContainers"].clone();
                    apply(&mut next, &spec_patch)?;
                    check_ephemeral_containers(stored, &next, name)?;
                } else {
                    apply(&mut next, &patch)?;
                    keep_stored_status(&mut next, stored);
                }
                // The patched object is decoded as a create's body is, without the wrapper.
                validation.check(&resource, &mut next, warnings, |e| e)?;
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

/// The pods subresource through which `kubectl debug` adds containers.
const EPHEMERAL_CONTAINERS: &str = "ephemeralcontainers";

/// The API server's rules for ephemeral containers: they may be added, never changed
/// or removed, and their names are unique among the pod's containers.
fn check_ephemeral_containers(stored: &Value, next: &Value, name: &str) -> Result<(), ApiError> {
    let invalid = |message: String| {
        status(
            422,
            "Invalid",
            format!("Pod \"{name}\" is invalid: spec.ephemeralContainers: {message}"),
            Some((name, "pods")),
        )
    };
    let list = |pod: &Value| {
        pod["spec"]["ephemeralContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let (before, after) = (list(stored), list(next));
    for old in &before {
        if !after.contains(old) {
            return Err(invalid(format!(
                "Forbidden: existing ephemeral containers {:?} may not be changed",
                old["name"].as_str().unwrap_or_default()
            )));
        }
    }
    let mut names = std::collections::HashSet::new();
    let containers = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| next["spec"][list].as_array().cloned().unwrap_or_default())
        .chain(after);
    for container in containers {
        let container_name = container["name"].as_str().unwrap_or_default().to_string();
        if !names.insert(container_name.clone()) {
            return Err(invalid(format!("Duplicate value: {container_name:?}")));
        }
    }
    Ok(())
}

/// The stored status, unchanged by a write to the main resource; an object without
/// status (a ConfigMap) gets no status key.
fn keep_stored_status(next: &mut Value, stored: &Value) {
    match stored.get("status") {
        Some(status) if !status.is_null() => next["status"] = status.clone(),
        _ => {
            if let Some(fields) = next.as_object_mut() {
                fields.remove("status");
            }
        }
    }
}

fn list(store: &Arc<Mutex<Store>>, target: &Target, params: &BTreeMap<String, String>) -> Value {
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
    json!({
        "kind": format!("{}List", target.resource.kind),
        "apiVersion": target.resource.api_version(),
        "metadata": {"resourceVersion": store.rv.to_string()},
        "items": items,
    })
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
    if target.resource.plural == "secrets" {
        fold_string_data(&mut next);
    }
    if target.resource.plural == "certificatesigningrequests" {
        csr_prepare_update(&stored, &mut next, target.subresource.as_deref(), name)?;
    }
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
    let updated = store.record("MODIFIED", key.clone(), next);
    if target.resource.plural == "nodes" {
        store.schedule();
    }
    if Store::certificate_related(&key) {
        // The csrapproving and csrsigning controllers, at once.
        store.certificate_controllers();
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

/// Removes its watch from [`Store::open_watches`] when the watch ends.
struct OpenWatchGuard {
    store: Arc<Mutex<Store>>,
    serial: u64,
}

impl Drop for OpenWatchGuard {
    fn drop(&mut self) {
        if let Ok(mut store) = self.store.lock() {
            store.open_watches.remove(&self.serial);
        }
    }
}

fn watch(
    store: Arc<Mutex<Store>>,
    target: Target,
    params: BTreeMap<String, String>,
    user_agent: String,
) -> Reply {
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
    let (backlog, mut live, kind, guard) = {
        let mut store_guard = store.lock().expect("store");
        let store_ref = &mut *store_guard;
        store_ref.watch_serial += 1;
        let serial = store_ref.watch_serial;
        store_ref.open_watches.insert(
            serial,
            OpenWatch {
                user_agent,
                resource: target.resource.plural.to_string(),
                namespace: target.namespace.clone(),
                field_selector: params.get("fieldSelector").cloned().unwrap_or_default(),
            },
        );
        let guard = OpenWatchGuard {
            store: store.clone(),
            serial,
        };
        let store = &*store_ref;
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
        (backlog, live, target.resource.kind, guard)
    };
    let store_for_bookmarks = store.clone();
    tokio::spawn(async move {
        // Open while this task serves the watch.
        let _guard = guard;
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
                // The client went away (its connection closed): the real server's
                // request context ends, and with it the watch.
                _ = tx.closed() => return,
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

fn timestamp(seconds: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// A Secret's write-only `stringData` is merged into `data` (base64), replacing keys of
/// the same name, and never stored, as the API server does.
fn fold_string_data(secret: &mut Value) {
    let Some(Value::Object(strings)) = secret.as_object_mut().and_then(|s| s.remove("stringData"))
    else {
        return;
    };
    if !secret["data"].is_object() {
        secret["data"] = json!({});
    }
    for (key, value) in strings {
        let bytes = value.as_str().unwrap_or_default().as_bytes().to_vec();
        secret["data"][key] =
            serde_json::to_value(k8s_openapi::ByteString(bytes)).unwrap_or(Value::Null);
    }
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A 422 Invalid with one field cause, as `errors.NewInvalid` builds it.
fn invalid(kind: &str, group: &str, name: &str, field: &str, detail: String) -> ApiError {
    let qualified = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    let mut error = status(
        422,
        "Invalid",
        format!("{qualified} \"{name}\" is invalid: {field}: {detail}"),
        None,
    );
    error.body["details"] = json!({
        "name": name,
        "group": group,
        "kind": kind,
        "causes": [{"reason": "FieldValueInvalid", "message": detail, "field": field}],
    });
    error
}

/// POST .../serviceaccounts/NAME/token, as the TokenRequest REST storage
/// (pkg/registry/core/serviceaccount/storage/token.go) answers it.
fn token_request(
    store: &Arc<Mutex<Store>>,
    namespace: &str,
    name: &str,
    mut request: Value,
) -> Result<Reply, ApiError> {
    const KIND: &str = "TokenRequest";
    const GROUP: &str = "authentication.k8s.io";
    let mut store = store.lock().expect("store");
    for (field, want, what) in [
        ("name", name, "name"),
        ("namespace", namespace, "namespace"),
    ] {
        let sent = request["metadata"][field].as_str().unwrap_or_default();
        if !sent.is_empty() && sent != want {
            return Err(invalid(
                KIND,
                GROUP,
                name,
                &format!("metadata.{field}"),
                format!(
                    "Invalid value: \"{sent}\": must match the service account {what} if specified"
                ),
            ));
        }
    }
    let sa_resource = Resource::find("", "v1", "serviceaccounts").expect("serviceaccounts");
    let Some(sa) = store
        .objects
        .get(&Store::key(&sa_resource, namespace, name))
        .cloned()
    else {
        return Err(not_found(&sa_resource, name));
    };
    let spec = &mut request["spec"];
    if spec["audiences"].as_array().is_none_or(|a| a.is_empty()) {
        spec["audiences"] = json!([API_AUDIENCE]);
    }
    if spec["expirationSeconds"].is_null() {
        spec["expirationSeconds"] = json!(3600);
    }
    let expiration = spec["expirationSeconds"].as_i64().unwrap_or(0);
    if expiration < 600 {
        return Err(invalid(
            KIND,
            GROUP,
            "",
            "spec.expirationSeconds",
            format!("Invalid value: {expiration}: may not specify a duration less than 10 minutes"),
        ));
    }
    if expiration > 1 << 32 {
        return Err(invalid(
            KIND,
            GROUP,
            "",
            "spec.expirationSeconds",
            format!(
                "Invalid value: {expiration}: may not specify a duration larger than 2^32 seconds"
            ),
        ));
    }
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut bound_pod: Option<Value> = None;
    let mut bound_node: Option<Value> = None;
    let mut bound_secret: Option<Value> = None;
    if spec["boundObjectRef"].is_object() {
        let reference = spec["boundObjectRef"].clone();
        let api_version = reference["apiVersion"].as_str().unwrap_or_default();
        let kind = reference["kind"].as_str().unwrap_or_default();
        let ref_name = reference["name"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let plural = match (group, kind) {
            ("", "Pod") => "pods",
            ("", "Node") => "nodes",
            ("", "Secret") => "secrets",
            _ => {
                return Err(status(
                    400,
                    "BadRequest",
                    format!("cannot bind token to object of type {group}/{version}, Kind={kind}"),
                    None,
                ))
            }
        };
        let resource = Resource::find("", "v1", plural).expect("core resource");
        let Some(object) = store
            .objects
            .get(&Store::key(&resource, namespace, ref_name))
            .cloned()
        else {
            return Err(not_found(&resource, ref_name));
        };
        if plural == "pods" && field(&object, "spec.serviceAccountName") != name {
            return Err(status(
                400,
                "BadRequest",
                format!("cannot bind token for serviceaccount \"{name}\" to pod running with different serviceaccount name."),
                None,
            ));
        }
        let uid = field(&object, "metadata.uid");
        let sent_uid = reference["uid"].as_str().unwrap_or_default();
        if !sent_uid.is_empty() && sent_uid != uid {
            return Err(status(
                409,
                "Conflict",
                format!("Operation cannot be fulfilled on {kind} \"{ref_name}\": the UID in the bound object reference ({sent_uid}) does not match the UID in record. The object might have been deleted and then recreated"),
                Some((ref_name, kind)),
            ));
        }
        match plural {
            "pods" => {
                // Since 1.30 the claims name the node a bound pod runs on.
                let node_name = field(&object, "spec.nodeName");
                let nodes = Resource::find("", "v1", "nodes").expect("nodes");
                bound_node = store
                    .objects
                    .get(&Store::key(&nodes, "", &node_name))
                    .cloned();
                bound_pod = Some(object);
            }
            "nodes" => bound_node = Some(object),
            _ => bound_secret = Some(object),
        }
    }
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    // --service-account-extend-token-expiration (on by default): a pod-bound token
    // asked for with the admission plugin's 3607 s lives a year, warning after 3607 s.
    let extended =
        bound_pod.is_some() && expiration == 3607 && audiences.iter().any(|a| a == API_AUDIENCE);
    let exp = if extended {
        now + 365 * 24 * 3600
    } else {
        now + expiration
    };
    let mut private = json!({
        "namespace": namespace,
        "serviceaccount": {"name": name, "uid": field(&sa, "metadata.uid")},
    });
    let reference =
        |o: &Value| json!({"name": field(o, "metadata.name"), "uid": field(o, "metadata.uid")});
    if let Some(pod) = &bound_pod {
        private["pod"] = reference(pod);
    }
    if let Some(node) = &bound_node {
        private["node"] = reference(node);
    }
    if let Some(secret) = &bound_secret {
        private["secret"] = reference(secret);
    }
    if extended {
        private["warnafter"] = json!(now + expiration);
    }
    let jti = store.new_uid();
    let claims = json!({
        "aud": audiences,
        "exp": exp,
        "iat": now,
        "nbf": now,
        "iss": API_AUDIENCE,
        "jti": jti,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io": private,
    });
    let signed = format!(
        "{}.{}",
        base64url(
            json!({"alg": "RS256", "kid": "fake-apiserver"})
                .to_string()
                .as_bytes()
        ),
        base64url(claims.to_string().as_bytes())
    );
    // Not a signature: nothing here verifies it.
    let signature = <sha2::Sha256 as sha2::Digest>::digest(signed.as_bytes());
    let token = format!("{signed}.{}", base64url(&signature));
    let mut extra = Map::new();
    if let Some(pod) = &bound_pod {
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            json!([field(pod, "metadata.name")]),
        );
        extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            json!([field(pod, "metadata.uid")]),
        );
    }
    if let Some(node) = &bound_node {
        extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            json!([field(node, "metadata.name")]),
        );
        extra.insert(
            "authentication.kubernetes.io/node-uid".into(),
            json!([field(node, "metadata.uid")]),
        );
    }
    extra.insert(
        "authentication.kubernetes.io/credential-id".into(),
        json!([format!("JTI={jti}")]),
    );
    store.token_users.insert(
        token.clone(),
        TokenUser {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            uid: field(&sa, "metadata.uid"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            audiences: audiences.clone(),
            expires: exp,
            extra,
        },
    );
    store.tokens.push(IssuedToken {
        namespace: namespace.to_string(),
        service_account: name.to_string(),
        pod: bound_pod.as_ref().map(|p| field(p, "metadata.name")),
        expiration_seconds: expiration,
        audiences,
        issued_at: now,
    });
    request["apiVersion"] = json!("authentication.k8s.io/v1");
    request["kind"] = json!(KIND);
    request["metadata"]["name"] = json!(name);
    request["metadata"]["namespace"] = json!(namespace);
    request["metadata"]["creationTimestamp"] = json!(timestamp(now));
    request["status"] = json!({"token": token, "expirationTimestamp": timestamp(now + expiration)});
    Ok(reply_json(201, &request))
}

/// The OpenAPI v3 documents the fake serves, generated from the real v1.32 API
/// definitions by tests/fixtures/openapi-v3/generate.py.
const OPENAPI_V3: &[(&str, &str)] = &[
    (
        "api/v1",
        include_str!("../fixtures/openapi-v3/api__v1_openapi.json"),
    ),
    (
        "apis/coordination.k8s.io/v1",
        include_str!("../fixtures/openapi-v3/apis__coordination.k8s.io__v1_openapi.json"),
    ),
    (
        "apis/events.k8s.io/v1",
        include_str!("../fixtures/openapi-v3/apis__events.k8s.io__v1_openapi.json"),
    ),
    (
        "apis/discovery.k8s.io/v1",
        include_str!("../fixtures/openapi-v3/apis__discovery.k8s.io__v1_openapi.json"),
    ),
    (
        "apis/networking.k8s.io/v1",
        include_str!("../fixtures/openapi-v3/apis__networking.k8s.io__v1_openapi.json"),
    ),
];

fn openapi_hash(doc: &str) -> String {
    hex::encode_upper(<sha2::Sha256 as sha2::Digest>::digest(doc.as_bytes()))
}

/// GET /openapi/v3 (the index of group-versions) and /openapi/v3/<gv>.
fn openapi(path: &str) -> Option<Reply> {
    let path = path.trim_end_matches('/');
    if path == "/openapi/v3" {
        let paths: Map<String, Value> = OPENAPI_V3
            .iter()
            .map(|(gv, doc)| {
                let url = format!("/openapi/v3/{gv}?hash={}", openapi_hash(doc));
                (gv.to_string(), json!({ "serverRelativeURL": url }))
            })
            .collect();
        return Some(reply_json(200, &json!({ "paths": paths })));
    }
    let gv = path.strip_prefix("/openapi/v3/")?;
    let (_, doc) = OPENAPI_V3.iter().find(|(name, _)| *name == gv)?;
    let mut reply = warp::reply::Response::new(doc.to_string().into());
    reply.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    Some(reply)
}

/// Every schema of the served documents, by definition name.
fn schemas() -> &'static Map<String, Value> {
    static SCHEMAS: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut all = Map::new();
        for (_, doc) in OPENAPI_V3 {
            let doc: Value = serde_json::from_str(doc).expect("OpenAPI fixture");
            if let Some(schemas) = doc["components"]["schemas"].as_object() {
                all.extend(schemas.clone());
            }
        }
        all
    })
}

/// The schema of a kind, found by its x-kubernetes-group-version-kind.
fn kind_schema(resource: &Resource) -> Option<&'static Value> {
    schemas().values().find(|schema| {
        schema["x-kubernetes-group-version-kind"]
            .as_array()
            .is_some_and(|gvks| {
                gvks.iter().any(|gvk| {
                    gvk["group"] == resource.group
                        && gvk["version"] == resource.version
                        && gvk["kind"] == resource.kind
                })
            })
    })
}

fn resolve(mut schema: &'static Value) -> &'static Value {
    loop {
        if let Some(name) = schema["$ref"].as_str() {
            match schemas().get(name.rsplit('/').next().unwrap_or_default()) {
                Some(next) => schema = next,
                None => return schema,
            }
        } else if let Some(first) = schema["allOf"].as_array().and_then(|a| a.first()) {
            schema = first;
        } else {
            return schema;
        }
    }
}

/// The first value whose JSON type is not its field's, as Go's decoder says it
/// (`json: cannot unmarshal string into Go struct field
/// SecretVolumeSource.spec.volumes.secret.defaultMode of type int32`); None when every
/// value decodes. `owner` is the Go struct holding the field at `path`.
fn type_mismatch(schema: &'static Value, value: &Value, path: &str, owner: &str) -> Option<String> {
    let resolved = resolve(schema);
    if value.is_null()
        || resolved["x-kubernetes-preserve-unknown-fields"] == true
        || resolved["x-kubernetes-int-or-string"] == true
    {
        return None;
    }
    let found = match value {
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => return None,
    };
    let json_type = |schema: &Value| match schema["type"].as_str() {
        Some("integer" | "number") => Some("number"),
        Some("boolean") => Some("bool"),
        Some("string") => Some("string"),
        Some("array") => Some("array"),
        Some("object") => Some("object"),
        _ if schema.get("properties").is_some() => Some("object"),
        _ => None,
    };
    if let Some(alternatives) = resolved["oneOf"].as_array() {
        // IntOrString, Quantity: either.
        let fits = alternatives.iter().any(|a| json_type(a) == Some(found));
        return (!fits).then(|| {
            format!("json: cannot unmarshal {found} into Go struct field {owner}.{path}")
        });
    }
    let expected = json_type(resolved)?;
    let go_type = match (expected, resolved["format"].as_str()) {
        ("number", Some(format)) => format,
        ("number", None) if resolved["type"] == "integer" => "int64",
        ("number", None) => "float64",
        (other, _) => other,
    };
    if found != expected {
        return Some(format!(
            "json: cannot unmarshal {found} into Go struct field {owner}.{path} of type {go_type}"
        ));
    }
    match value {
        Value::Object(map) => {
            // The Go struct this object decodes into, named by its definition.
            let reference = schema["$ref"]
                .as_str()
                .or(schema["allOf"][0]["$ref"].as_str());
            let owner = reference
                .and_then(|r| r.rsplit('.').next())
                .unwrap_or(owner);
            let join = |name: &str| {
                if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                }
            };
            if let Some(properties) = resolved["properties"].as_object() {
                map.iter().find_map(|(name, child)| {
                    type_mismatch(properties.get(name)?, child, &join(name), owner)
                })
            } else if resolved["additionalProperties"].is_object() {
                map.iter().find_map(|(name, child)| {
                    type_mismatch(&resolved["additionalProperties"], child, &join(name), owner)
                })
            } else {
                None
            }
        }
        Value::Array(items) if resolved["items"].is_object() => items
            .iter()
            .find_map(|item| type_mismatch(&resolved["items"], item, path, owner)),
        _ => None,
    }
}

/// A field the schema does not declare, named as strict decoding names it
/// (`spec.containers[0].foo`) and as server-side apply does (`.spec.containers[name="c"].foo`).
struct UnknownField {
    strict: String,
    apply: String,
}

/// Finds (and, with `prune`, drops) the fields of `value` that `schema` does not declare,
/// as decoding into the API's Go types does.
fn unknown_fields(
    schema: &'static Value,
    value: &mut Value,
    path: (&str, &str),
    prune: bool,
    out: &mut Vec<UnknownField>,
) {
    let outer = schema;
    let schema = resolve(schema);
    if schema["x-kubernetes-preserve-unknown-fields"] == true {
        return;
    }
    let join = |name: &str| {
        (
            if path.0.is_empty() {
                name.to_string()
            } else {
                format!("{}.{name}", path.0)
            },
            format!("{}.{name}", path.1),
        )
    };
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                let mut unknown = vec![];
                for (name, child) in map.iter_mut() {
                    let (strict, apply) = join(name);
                    match properties.get(name) {
                        Some(child_schema) => {
                            unknown_fields(child_schema, child, (&strict, &apply), prune, out)
                        }
                        None => {
                            out.push(UnknownField { strict, apply });
                            unknown.push(name.clone());
                        }
                    }
                }
                if prune {
                    for name in unknown {
                        map.remove(&name);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for (name, child) in map.iter_mut() {
                    let (strict, apply) = join(name);
                    unknown_fields(
                        &schema["additionalProperties"],
                        child,
                        (&strict, &apply),
                        prune,
                        out,
                    );
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            let keys: Vec<&str> = outer["x-kubernetes-list-map-keys"]
                .as_array()
                .or(schema["x-kubernetes-list-map-keys"].as_array())
                .map(|k| k.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (i, item) in items.iter_mut().enumerate() {
                let strict = format!("{}[{i}]", path.0);
                let apply = if keys.is_empty() {
                    format!("{}[{i}]", path.1)
                } else {
                    let pairs: Vec<String> = keys
                        .iter()
                        .filter(|k| !item[**k].is_null())
                        .map(|k| format!("{k}={}", item[*k]))
                        .collect();
                    format!("{}[{}]", path.1, pairs.join(","))
                };
                unknown_fields(&schema["items"], item, (&strict, &apply), prune, out);
            }
        }
        _ => {}
    }
}

/// How a write treats fields the schema does not declare (the `fieldValidation`
/// query parameter; Warn is the API server's default since 1.27).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    fn from_params(params: &BTreeMap<String, String>) -> Result<FieldValidation, ApiError> {
        match params.get("fieldValidation").map(String::as_str) {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(status(
                400,
                "BadRequest",
                format!("fieldValidation must be one of \"Ignore\", \"Warn\", or \"Strict\", got {other:?}"),
                None,
            )),
        }
    }

    /// Checks a decoded object: Strict refuses unknown fields with the strict decoding
    /// error (its message wrapped by `wrap`), Warn drops them with a warning each,
    /// Ignore drops them.
    fn check(
        self,
        resource: &Resource,
        object: &mut Value,
        warnings: &mut Vec<String>,
        wrap: impl FnOnce(String) -> String,
    ) -> Result<(), ApiError> {
        let Some(schema) = kind_schema(resource) else {
            return Ok(());
        };
        // Decoding fails on a value of the wrong type whatever the field validation.
        if let Some(mismatch) = type_mismatch(schema, object, "", resource.kind) {
            return Err(status(400, "BadRequest", wrap(mismatch), None));
        }
        let mut unknown = vec![];
        unknown_fields(
            schema,
            object,
            ("", ""),
            self != FieldValidation::Strict,
            &mut unknown,
        );
        if unknown.is_empty() {
            return Ok(());
        }
        let messages: Vec<String> = unknown
            .iter()
            .map(|u| format!("unknown field \"{}\"", u.strict))
            .collect();
        match self {
            FieldValidation::Strict => Err(status(
                400,
                "BadRequest",
                wrap(format!("strict decoding error: {}", messages.join(", "))),
                None,
            )),
            FieldValidation::Warn => {
                warnings.extend(messages);
                Ok(())
            }
            FieldValidation::Ignore => Ok(()),
        }
    }
}

/// Server-side apply types the applied configuration against the schema whatever
/// fieldValidation says; an undeclared field fails it (a 500 on a real server).
fn check_apply(
    resource: &Resource,
    namespace: &str,
    name: &str,
    patch: &Value,
) -> Result<(), ApiError> {
    let Some(schema) = kind_schema(resource) else {
        return Ok(());
    };
    let mut unknown = vec![];
    unknown_fields(schema, &mut patch.clone(), ("", ""), false, &mut unknown);
    if unknown.is_empty() {
        return Ok(());
    }
    let errors: Vec<String> = unknown
        .iter()
        .map(|u| format!("{}: field not declared in schema", u.apply))
        .collect();
    let errors = if errors.len() == 1 {
        errors[0].clone()
    } else {
        format!("errors:\n  {}", errors.join("\n  "))
    };
    let object = if namespace.is_empty() {
        format!("/{name}")
    } else {
        format!("{namespace}/{name}")
    };
    let group = resource.group;
    let version = resource.version;
    let kind = resource.kind;
    Err(status(
        500,
        "",
        format!("failed to create typed patch object ({object}; {group}/{version}, Kind={kind}): {errors}"),
        None,
    ))
}

/// Whether a GET asks for server-side printing (`kubectl get` does); answered for the
/// kinds whose printers the fake has, pods and core events, as the real printers
/// (pkg/printers/internalversion) print them.
fn table_wanted(resource: &Resource, accept: Option<&str>) -> bool {
    resource.group.is_empty()
        && matches!(resource.plural, "pods" | "events")
        && accept.is_some_and(|a| {
            a.split(',').any(|t| {
                t.contains("as=Table") && t.contains("g=meta.k8s.io") && t.contains("v=v1")
            })
        })
}

/// How long ago, as the API server's printers say it (duration.HumanDuration).
fn age(time: &str) -> String {
    let Ok(then) = time.parse::<k8s_openapi::jiff::Timestamp>() else {
        return "<unknown>".to_string();
    };
    let seconds = k8s_openapi::jiff::Timestamp::now().as_second() - then.as_second();
    let (minutes, hours) = (seconds / 60, seconds / 3600);
    match seconds {
        s if s < -1 => "<invalid>".to_string(),
        s if s < 0 => "0s".to_string(),
        s if s < 120 => format!("{s}s"),
        _ if minutes < 10 && seconds % 60 == 0 => format!("{minutes}m"),
        _ if minutes < 10 => format!("{minutes}m{}s", seconds % 60),
        _ if minutes < 180 => format!("{minutes}m"),
        _ if hours < 8 && minutes % 60 == 0 => format!("{hours}h"),
        _ if hours < 8 => format!("{hours}h{}m", minutes % 60),
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 192 && hours % 24 == 0 => format!("{}d", hours / 24),
        _ if hours < 192 => format!("{}d{}h", hours / 24, hours % 24),
        _ if hours < 24 * 365 * 2 => format!("{}d", hours / 24),
        _ if hours < 24 * 365 * 8 && (hours / 24) % 365 == 0 => format!("{}y", hours / 24 / 365),
        _ if hours < 24 * 365 * 8 => format!("{}y{}d", hours / 24 / 365, (hours / 24) % 365),
        _ => format!("{}y", hours / 24 / 365),
    }
}

fn pod_row(pod: &Value) -> Vec<Value> {
    let containers = pod["spec"]["containers"].as_array().map_or(0, Vec::len);
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ready = statuses.iter().filter(|s| s["ready"] == true).count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|s| s["restartCount"].as_i64())
        .sum();
    let mut reason = pod["status"]["reason"]
        .as_str()
        .or(pod["status"]["phase"].as_str())
        .unwrap_or_default()
        .to_string();
    for s in statuses.iter().rev() {
        let state = &s["state"];
        if let Some(why) = state["waiting"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty())
        {
            reason = why.to_string();
        } else if let Some(why) = state["terminated"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty())
        {
            reason = why.to_string();
        } else if state["terminated"].is_object() {
            reason = match state["terminated"]["signal"].as_i64().filter(|s| *s != 0) {
                Some(signal) => format!("Signal:{signal}"),
                None => format!(
                    "ExitCode:{}",
                    state["terminated"]["exitCode"].as_i64().unwrap_or(0)
                ),
            };
        }
    }
    if !pod["metadata"]["deletionTimestamp"].is_null() && reason != "NodeLost" {
        reason = "Terminating".to_string();
    }
    let or_none = |v: String| {
        if v.is_empty() {
            "<none>".to_string()
        } else {
            v
        }
    };
    vec![
        json!(field(pod, "metadata.name")),
        json!(format!("{ready}/{containers}")),
        json!(reason),
        json!(restarts.to_string()),
        json!(age(&field(pod, "metadata.creationTimestamp"))),
        json!(or_none(field(pod, "status.podIP"))),
        json!(or_none(field(pod, "spec.nodeName"))),
        json!(or_none(field(pod, "status.nominatedNodeName"))),
        json!("<none>"),
    ]
}

fn event_row(event: &Value) -> Vec<Value> {
    let first = match field(event, "firstTimestamp") {
        t if t.is_empty() => age(&field(event, "eventTime")),
        t => age(&t),
    };
    let mut last = match field(event, "lastTimestamp") {
        t if t.is_empty() => first.clone(),
        t => age(&t),
    };
    let mut count = event["count"].as_i64().unwrap_or(0);
    if event["series"].is_object() {
        last = age(&field(event, "series.lastObservedTime"));
        count = event["series"]["count"].as_i64().unwrap_or(0);
    } else if count == 0 {
        count = 1;
    }
    let kind = field(event, "involvedObject.kind").to_lowercase();
    let name = field(event, "involvedObject.name");
    let target = if name.is_empty() {
        kind
    } else {
        format!("{kind}/{name}")
    };
    let first_non_empty = |a: String, b: String| if a.is_empty() { b } else { a };
    let component = first_non_empty(
        field(event, "source.component"),
        field(event, "reportingComponent"),
    );
    let instance = first_non_empty(
        field(event, "source.host"),
        field(event, "reportingInstance"),
    );
    let source = match (component.is_empty(), instance.is_empty()) {
        (true, _) => "<unknown>".to_string(),
        (false, true) => component,
        (false, false) => format!("{component}, {instance}"),
    };
    vec![
        json!(last),
        json!(field(event, "type")),
        json!(field(event, "reason")),
        json!(target),
        json!(field(event, "involvedObject.fieldPath")),
        json!(source),
        json!(field(event, "message").trim()),
        json!(first),
        json!(count),
        json!(field(event, "metadata.name")),
    ]
}

/// Prints one object as a Table row's cells.
type Printer = fn(&Value) -> Vec<Value>;

/// A meta.k8s.io/v1 Table of a list (or of one object, as a list of one).
fn table(resource: &Resource, list: &Value, params: &BTreeMap<String, String>) -> Value {
    let column = |name: &str, kind: &str, format: &str, priority: u8| json!({"name": name, "type": kind, "format": format, "description": "", "priority": priority});
    let (columns, row): (Vec<Value>, Printer) = match resource.plural {
        "pods" => (
            vec![
                column("Name", "string", "name", 0),
                column("Ready", "string", "", 0),
                column("Status", "string", "", 0),
                column("Restarts", "string", "", 0),
                column("Age", "string", "", 0),
                column("IP", "string", "", 1),
                column("Node", "string", "", 1),
                column("Nominated Node", "string", "", 1),
                column("Readiness Gates", "string", "", 1),
            ],
            pod_row,
        ),
        _ => (
            vec![
                column("Last Seen", "string", "", 0),
                column("Type", "string", "", 0),
                column("Reason", "string", "", 0),
                column("Object", "string", "", 0),
                column("Subobject", "string", "", 1),
                column("Source", "string", "", 1),
                column("Message", "string", "", 0),
                column("First Seen", "string", "", 1),
                column("Count", "integer", "", 1),
                column("Name", "string", "", 1),
            ],
            event_row,
        ),
    };
    let include = params
        .get("includeObject")
        .map_or("Metadata", String::as_str);
    let rows: Vec<Value> = list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| {
                    let mut out = json!({"cells": row(item)});
                    match include {
                        "None" => {}
                        "Object" => out["object"] = item.clone(),
                        _ => {
                            out["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": item["metadata"]})
                        }
                    }
                    out
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": list["metadata"]["resourceVersion"]},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

/// Runs the real kubectl against `kubeconfig`: its success and combined output.
pub fn kubectl(kubeconfig: &std::path::Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("kubectl ends");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A 422 Invalid with several field errors, as `errors.NewInvalid` builds it: each
/// error is (cause reason, field, "Required value: ..." / "Invalid value: ...").
fn invalid_all(kind: &str, group: &str, name: &str, errors: &[(&str, String, String)]) -> ApiError {
    let texts: Vec<String> = errors
        .iter()
        .map(|(_, field, body)| format!("{field}: {body}"))
        .collect();
    let joined = if texts.len() == 1 {
        texts[0].clone()
    } else {
        format!("[{}]", texts.join(", "))
    };
    let mut error = status(
        422,
        "Invalid",
        format!("{kind}.{group} \"{name}\" is invalid: {joined}"),
        None,
    );
    let causes: Vec<Value> = errors
        .iter()
        .map(|(reason, field, body)| json!({"reason": reason, "message": body, "field": field}))
        .collect();
    error.body["details"] = json!({"name": name, "group": group, "kind": kind, "causes": causes});
    error
}

/// Go's `%#v` of a byte slice, as `field.Invalid` prints `spec.request`.
fn go_bytes(bytes: &[u8]) -> String {
    let items: Vec<String> = bytes.iter().map(|b| format!("0x{b:x}")).collect();
    format!("[]byte{{{}}}", items.join(", "))
}

impl Store {
    /// Who a request authenticates as (the fake does not refuse anyone: without a
    /// known credential a request is anonymous but still served): a verified client
    /// certificate first (kube-apiserver's x509 authenticator comes before tokens; CN the
    /// user, O the groups, plus system:authenticated), then the bearer token.
    fn requester(&self, identity: Option<&ClientIdentity>, bearer: Option<&str>) -> TokenUser {
        if let Some(identity) = identity {
            let mut groups = identity.groups.clone();
            groups.push("system:authenticated".into());
            return TokenUser {
                username: identity.user.clone(),
                uid: String::new(),
                groups,
                audiences: vec![],
                expires: 0,
                extra: Map::new(),
            };
        }
        bearer
            .and_then(|t| self.token_users.get(t))
            .cloned()
            .unwrap_or_else(|| TokenUser {
                username: "system:anonymous".into(),
                uid: String::new(),
                groups: vec!["system:unauthenticated".into()],
                audiences: vec![],
                expires: 0,
                extra: Map::new(),
            })
    }

    /// Whether a write can change what the certificate controllers do: a CSR, or an RBAC
    /// object (the approver's SubjectAccessReviews read them).
    fn certificate_related(key: &Key) -> bool {
        key.plural == "certificatesigningrequests" || key.group == "rbac.authorization.k8s.io"
    }

    /// kube-controller-manager's csrapproving and csrsigning controllers, run at once
    /// after every write to a CSR or an RBAC object (a real controller retries a CSR it
    /// did not approve; here it is looked at again on those writes).
    fn certificate_controllers(&mut self) {
        let keys: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| {
                k.group == "certificates.k8s.io" && k.plural == "certificatesigningrequests"
            })
            .cloned()
            .collect();
        for key in keys {
            self.approve_csr(&key);
            self.sign_csr(&key);
        }
    }

    /// The csrapproving controller (pkg/controller/certificates/approver/sarapprove.go):
    /// a CSR without certificate and without an Approved or Denied condition that is a
    /// kubelet client request (`kubernetes.io/kube-apiserver-client-kubelet`,
    /// `IsKubeletClientCSR`) is approved (reason AutoApproved) if a SubjectAccessReview
    /// for its requester allows `create` on `certificatesigningrequests/selfnodeclient`
    /// (when the requester is the CN) or, failing that, `.../nodeclient`. Otherwise it
    /// stays pending.
    fn approve_csr(&mut self, key: &Key) {
        let Some(mut csr) = self.objects.get(key).cloned() else {
            return;
        };
        if csr["status"]["certificate"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            return;
        }
        let decided = csr["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Approved" || c["type"] == "Denied")
        });
        if decided || csr["spec"]["signerName"] != KUBELET_CLIENT_SIGNER {
            return;
        }
        let request = pki::base64_decode(csr["spec"]["request"].as_str().unwrap_or_default())
            .unwrap_or_default();
        let Ok(parsed) = pki::parse_csr(&request) else {
            return;
        };
        if validate_kubelet_client(&parsed, &strings(&csr["spec"]["usages"])).is_err() {
            return;
        }
        let username = csr["spec"]["username"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let recognizers = [
            (
                "selfnodeclient",
                username == parsed.common_name,
                "Auto approving self kubelet client certificate after SubjectAccessReview.",
            ),
            (
                "nodeclient",
                true,
                "Auto approving kubelet client certificate after SubjectAccessReview.",
            ),
        ];
        for (subresource, recognized, message) in recognizers {
            if !recognized {
                continue;
            }
            let attrs = Attributes {
                user: username.clone(),
                groups: strings(&csr["spec"]["groups"]),
                verb: "create".into(),
                namespace: String::new(),
                group: "certificates.k8s.io".into(),
                resource: "certificatesigningrequests".into(),
                subresource: subresource.into(),
                name: String::new(),
                path: None,
            };
            if !self.authorize(&attrs).0 {
                continue;
            }
            let now = now();
            if !csr["status"]["conditions"].is_array() {
                csr["status"]["conditions"] = json!([]);
            }
            if let Some(conditions) = csr["status"]["conditions"].as_array_mut() {
                conditions.push(json!({
                    "type": "Approved",
                    "status": "True",
                    "reason": "AutoApproved",
                    "message": message,
                    "lastUpdateTime": now,
                    "lastTransitionTime": now,
                }));
            }
            self.record("MODIFIED", key.clone(), csr);
            return;
        }
    }

    /// The csrsigning controllers (pkg/controller/certificates/signer): an Approved, not
    /// Failed, unsigned request for `kubernetes.io/kubelet-serving` is checked with
    /// `ValidateKubeletServingCSR` and signed with the cluster CA; one for
    /// `kubernetes.io/kube-apiserver-client-kubelet` is checked with
    /// `ValidateKubeletClientCSR` and signed with the client CA (as k3s points
    /// `--cluster-signing-kubelet-client-cert-file` at it). A request that fails its
    /// check gets a Failed condition, reason SignerValidationFailure.
    fn sign_csr(&mut self, key: &Key) {
        let Some(mut csr) = self.objects.get(key).cloned() else {
            return;
        };
        let has = |csr: &Value, ty: &str| {
            csr["status"]["conditions"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == ty && c["status"] == "True"))
        };
        if !has(&csr, "Approved")
            || has(&csr, "Failed")
            || csr["status"]["certificate"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        {
            return;
        }
        type Validator = fn(&pki::Csr, &[String]) -> Result<(), String>;
        let (validate, ca): (Validator, pki::SigningCa) = match csr["spec"]["signerName"].as_str() {
            Some(KUBELET_SERVING_SIGNER) => (validate_kubelet_serving, pki::SigningCa::Cluster),
            Some(KUBELET_CLIENT_SIGNER) => (validate_kubelet_client, pki::SigningCa::Client),
            _ => return,
        };
        let request = pki::base64_decode(csr["spec"]["request"].as_str().unwrap_or_default())
            .unwrap_or_default();
        let Ok(parsed) = pki::parse_csr(&request) else {
            // The controller logs "unable to parse csr" and retries; nothing changes.
            return;
        };
        let usages = strings(&csr["spec"]["usages"]);
        match validate(&parsed, &usages) {
            Err(message) => {
                let now = now();
                if !csr["status"]["conditions"].is_array() {
                    csr["status"]["conditions"] = json!([]);
                }
                if let Some(conditions) = csr["status"]["conditions"].as_array_mut() {
                    conditions.push(json!({
                        "type": "Failed",
                        "status": "True",
                        "reason": "SignerValidationFailure",
                        "message": message,
                        "lastUpdateTime": now,
                        "lastTransitionTime": now,
                    }));
                }
            }
            Ok(()) => {
                // --cluster-signing-duration defaults to a year; expirationSeconds may
                // only shorten it, to no less than 10 minutes.
                const YEAR: i64 = 8760 * 3600;
                let mut ttl = csr["spec"]["expirationSeconds"]
                    .as_i64()
                    .map_or(YEAR, |s| s.clamp(600, YEAR));
                if ca == pki::SigningCa::Client {
                    ttl = self.client_cert_ttl.unwrap_or(ttl);
                }
                let pem = self.pki.sign(&parsed, &usages, ttl, ca);
                csr["status"]["certificate"] = json!(pki::base64_encode(pem.as_bytes()));
            }
        }
        self.record("MODIFIED", key.clone(), csr);
    }

    /// The `default/kubernetes` Endpoints a k3s server's API server maintains: one
    /// subset per listener (all on 127.0.0.1 here, so each has its own port), port name
    /// `https`.
    fn add_api_endpoint(&mut self, port: u16) {
        let resource = Resource::find("", "v1", "endpoints").expect("endpoints");
        let key = Store::key(&resource, "default", "kubernetes");
        let subset = json!({
            "addresses": [{"ip": "127.0.0.1"}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        });
        match self.objects.get(&key).cloned() {
            Some(mut endpoints) => {
                if let Some(subsets) = endpoints["subsets"].as_array_mut() {
                    subsets.push(subset);
                }
                self.record("MODIFIED", key, endpoints);
            }
            None => {
                let _ = self.create(
                    &resource,
                    "default",
                    json!({
                        "metadata": {
                            "name": "kubernetes",
                            "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
                        },
                        "subsets": [subset],
                    }),
                );
            }
        }
    }
}

const KUBELET_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";
const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";

/// `ValidateKubeletClientCSR` (pkg/apis/certificates/helpers.go), in its order, with the
/// messages of the releases the fake follows (newer ones say "Email" and drop the quotes).
fn validate_kubelet_client(csr: &pki::Csr, usages: &[String]) -> Result<(), String> {
    if csr.organizations != ["system:nodes"] {
        return Err("subject organization is not system:nodes".into());
    }
    if !csr.dns_names.is_empty() {
        return Err("DNS subjectAltNames are not allowed".into());
    }
    if !csr.emails.is_empty() {
        return Err("email subjectAltNames are not allowed".into());
    }
    if !csr.ip_addresses.is_empty() {
        return Err("IP subjectAltNames are not allowed".into());
    }
    if !csr.uris.is_empty() {
        return Err("URI subjectAltNames are not allowed".into());
    }
    if !csr.common_name.starts_with("system:node:") {
        return Err("subject common name does not begin with 'system:node:'".into());
    }
    let set: std::collections::BTreeSet<&str> = usages.iter().map(String::as_str).collect();
    let with_rsa =
        std::collections::BTreeSet::from(["client auth", "digital signature", "key encipherment"]);
    let without_rsa = std::collections::BTreeSet::from(["client auth", "digital signature"]);
    if set != with_rsa && set != without_rsa {
        return Err("usages did not match [client auth digital signature key encipherment]".into());
    }
    Ok(())
}

/// `ValidateKubeletServingCSR` (pkg/apis/certificates/v1/helpers.go), in its order.
fn validate_kubelet_serving(csr: &pki::Csr, usages: &[String]) -> Result<(), String> {
    if csr.organizations != ["system:nodes"] {
        return Err("subject organization is not system:nodes".into());
    }
    if csr.dns_names.is_empty() && csr.ip_addresses.is_empty() {
        return Err("DNS or IP subjectAltName is required".into());
    }
    if !csr.emails.is_empty() {
        return Err("email subjectAltNames are not allowed".into());
    }
    if !csr.uris.is_empty() {
        return Err("URI subjectAltNames are not allowed".into());
    }
    let set: std::collections::BTreeSet<&str> = usages.iter().map(String::as_str).collect();
    let with_rsa =
        std::collections::BTreeSet::from(["digital signature", "key encipherment", "server auth"]);
    let without_rsa = std::collections::BTreeSet::from(["digital signature", "server auth"]);
    if set != with_rsa && set != without_rsa {
        return Err("usages did not match [digital signature key encipherment server auth]".into());
    }
    if !csr.common_name.starts_with("system:node:") {
        return Err("subject common name does not begin with 'system:node:'".into());
    }
    Ok(())
}

const CSR_USAGES: &[&str] = &[
    "any",
    "cert sign",
    "client auth",
    "code signing",
    "content commitment",
    "crl sign",
    "data encipherment",
    "decipher only",
    "digital signature",
    "email protection",
    "encipher only",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "key agreement",
    "key encipherment",
    "microsoft sgc",
    "netscape sgc",
    "ocsp signing",
    "s/mime",
    "server auth",
    "signing",
    "timestamping",
];

/// CSR create: the strategy's PrepareForCreate (requester identity into spec, status
/// cleared) and ValidateCertificateSigningRequestCreate.
fn csr_prepare_create(csr: &mut Value, requester: &TokenUser) -> Result<(), ApiError> {
    csr["status"] = json!({});
    let spec = &mut csr["spec"];
    spec["username"] = json!(requester.username);
    if requester.uid.is_empty() {
        if let Some(s) = spec.as_object_mut() {
            s.remove("uid");
        }
    } else {
        spec["uid"] = json!(requester.uid);
    }
    spec["groups"] = json!(requester.groups);
    if requester.extra.is_empty() {
        if let Some(s) = spec.as_object_mut() {
            s.remove("extra");
        }
    } else {
        spec["extra"] = Value::Object(requester.extra.clone());
    }
    let mut errors: Vec<(&str, String, String)> = vec![];
    let request =
        pki::base64_decode(spec["request"].as_str().unwrap_or_default()).unwrap_or_default();
    if let Err(e) = pki::parse_csr(&request) {
        errors.push((
            "FieldValueInvalid",
            "spec.request".into(),
            format!("Invalid value: {}: {e}", go_bytes(&request)),
        ));
    }
    let usages: Vec<String> = spec["usages"]
        .as_array()
        .map(|u| {
            u.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    if usages.is_empty() {
        errors.push((
            "FieldValueRequired",
            "spec.usages".into(),
            "Required value: usages must be provided".into(),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, usage) in usages.iter().enumerate() {
        if !CSR_USAGES.contains(&usage.as_str()) {
            let supported: Vec<String> = CSR_USAGES.iter().map(|u| format!("\"{u}\"")).collect();
            errors.push((
                "FieldValueNotSupported",
                format!("spec.usages[{i}]"),
                format!(
                    "Unsupported value: \"{usage}\": supported values: {}",
                    supported.join(", ")
                ),
            ));
        }
        if !seen.insert(usage.clone()) {
            errors.push((
                "FieldValueDuplicate",
                format!("spec.usages[{i}]"),
                format!("Duplicate value: \"{usage}\""),
            ));
        }
    }
    if spec["signerName"].as_str().is_none_or(str::is_empty) {
        errors.push((
            "FieldValueRequired",
            "spec.signerName".into(),
            "Required value".into(),
        ));
    }
    if let Some(seconds) = spec["expirationSeconds"].as_i64() {
        if seconds < 600 {
            errors.push((
                "FieldValueInvalid",
                "spec.expirationSeconds".into(),
                format!("Invalid value: {seconds}: may not specify a duration less than 600 seconds (10 minutes)"),
            ));
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    let name = field(csr, "metadata.name");
    Err(invalid_all(
        "CertificateSigningRequest",
        "certificates.k8s.io",
        &name,
        &errors,
    ))
}

/// CSR updates: spec is immutable; the main resource changes metadata only, /approval
/// the conditions only, /status the conditions and the certificate. Conditions get
/// status True and timestamps by default; Approved and Denied exclude each other and,
/// once set, stay.
fn csr_prepare_update(
    stored: &Value,
    next: &mut Value,
    subresource: Option<&str>,
    name: &str,
) -> Result<(), ApiError> {
    next["spec"] = stored["spec"].clone();
    match subresource {
        None => next["status"] = stored["status"].clone(),
        Some("approval") => next["status"]["certificate"] = stored["status"]["certificate"].clone(),
        _ => {}
    }
    if next["status"]["certificate"].is_null() {
        if let Some(s) = next["status"].as_object_mut() {
            s.remove("certificate");
        }
    }
    let old: Vec<Value> = stored["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let now = now();
    let mut errors: Vec<(&str, String, String)> = vec![];
    if let Some(conditions) = next["status"]["conditions"].as_array_mut() {
        for condition in conditions.iter_mut() {
            if condition["status"].as_str().is_none_or(str::is_empty) {
                condition["status"] = json!("True");
            }
            let before = old.iter().find(|o| o["type"] == condition["type"]);
            if condition["lastUpdateTime"].is_null() {
                condition["lastUpdateTime"] = before
                    .filter(|o| o["status"] == condition["status"])
                    .map_or(json!(now), |o| o["lastUpdateTime"].clone());
            }
            if condition["lastTransitionTime"].is_null() {
                condition["lastTransitionTime"] = before
                    .filter(|o| o["status"] == condition["status"])
                    .map_or(json!(now), |o| o["lastTransitionTime"].clone());
            }
        }
        let types: Vec<&str> = conditions
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        if types.contains(&"Approved") && types.contains(&"Denied") {
            errors.push((
                "FieldValueInvalid",
                "status.conditions".into(),
                format!(
                    "Invalid value: {}: Approved and Denied conditions are mutually exclusive",
                    Value::Array(conditions.clone())
                ),
            ));
        }
    }
    let types: Vec<String> = next["status"]["conditions"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["type"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for kept in ["Approved", "Denied"] {
        if old.iter().any(|o| o["type"] == kept) && !types.iter().any(|t| t == kept) {
            errors.push((
                "FieldValueForbidden",
                "status.conditions".into(),
                format!("Forbidden: updates may not remove a condition of type \"{kept}\""),
            ));
        }
    }
    if errors.is_empty() {
        return Ok(());
    }
    Err(invalid_all(
        "CertificateSigningRequest",
        "certificates.k8s.io",
        name,
        &errors,
    ))
}

/// The review objects' answer shape: what was sent, no stored metadata.
fn review_reply(mut review: Value, api_version: &str, kind: &str, result: Value) -> Reply {
    review["apiVersion"] = json!(api_version);
    review["kind"] = json!(kind);
    if !review["metadata"].is_object() {
        review["metadata"] = json!({});
    }
    review["metadata"]["creationTimestamp"] = Value::Null;
    review["status"] = result;
    reply_json(201, &review)
}

/// POST /apis/authentication.k8s.io/v1/tokenreviews (pkg/registry/authentication/tokenreview):
/// the fake's tokens (the kubeconfig's static token, TokenRequest's service account
/// tokens) authenticate; anything else is `authenticated` false, with no user.
fn token_review(store: &Store, review: Value) -> Result<Reply, ApiError> {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    if token.is_empty() {
        return Err(status(
            400,
            "BadRequest",
            "token is required for TokenReview in authentication".into(),
            None,
        ));
    }
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_else(|| vec![API_AUDIENCE.to_string()]);
    let unauthenticated = |error: Option<String>| {
        let mut status = json!({"user": {}});
        if let Some(error) = error {
            status["error"] = json!(error);
        }
        Ok(review_reply(
            review.clone(),
            "authentication.k8s.io/v1",
            "TokenReview",
            status,
        ))
    };
    let Some(user) = store.token_users.get(token) else {
        return unauthenticated(None);
    };
    // A token that is not audience-aware (the static one) counts for the API server's
    // own audiences.
    let token_audiences = if user.audiences.is_empty() {
        vec![API_AUDIENCE.to_string()]
    } else {
        user.audiences.clone()
    };
    let audiences: Vec<String> = wanted
        .iter()
        .filter(|a| token_audiences.contains(a))
        .cloned()
        .collect();
    if audiences.is_empty() {
        return unauthenticated(Some(format!(
            "token audiences {token_audiences:?} is invalid for the target audiences {wanted:?}"
        )));
    }
    if user.expires != 0 && user.expires < k8s_openapi::jiff::Timestamp::now().as_second() {
        return unauthenticated(Some("service account token has expired".into()));
    }
    let mut info = json!({"username": user.username, "groups": user.groups});
    if !user.uid.is_empty() {
        info["uid"] = json!(user.uid);
    }
    if !user.extra.is_empty() {
        info["extra"] = Value::Object(user.extra.clone());
    }
    Ok(review_reply(
        review.clone(),
        "authentication.k8s.io/v1",
        "TokenReview",
        json!({"authenticated": true, "user": info, "audiences": audiences}),
    ))
}

/// What a SubjectAccessReview asks about.
struct Attributes {
    user: String,
    groups: Vec<String>,
    verb: String,
    namespace: String,
    group: String,
    resource: String,
    subresource: String,
    name: String,
    /// Some for a non-resource request.
    path: Option<String>,
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What kube-apiserver's RequestInfoFactory makes of a resource request, for the
/// authorizer. A list or watch whose field selector requires `metadata.name=NAME` carries
/// that NAME (since Kubernetes 1.11), so `resourceNames` can authorize it.
fn request_attributes(
    method: &warp::http::Method,
    target: &Target,
    params: &BTreeMap<String, String>,
    requester: &TokenUser,
) -> Attributes {
    let record = RequestRecord::new(method, target, params, String::new());
    let mut name = record.name.clone();
    if name.is_empty() && (record.verb == "list" || record.verb == "watch") {
        name = params
            .get("fieldSelector")
            .into_iter()
            .flat_map(|selector| selector.split(','))
            .find_map(|term| {
                let (field, value) = term.split_once("==").or_else(|| term.split_once('='))?;
                // `metadata.name!=X` splits as "metadata.name!": not a match.
                (field.trim() == "metadata.name").then(|| value.trim().to_string())
            })
            .unwrap_or_default();
    }
    Attributes {
        user: requester.username.clone(),
        groups: requester.groups.clone(),
        verb: record.verb.to_string(),
        namespace: target.namespace.clone(),
        group: target.resource.group.to_string(),
        resource: target.resource.plural.to_string(),
        subresource: target.subresource.clone().unwrap_or_default(),
        name,
        path: None,
    }
}

/// The 403 of kube-apiserver's authorization filter (`responsewriters.Forbidden`:
/// `forbiddenMessage` wrapped by `apierrors.NewForbidden`), as real clients receive it.
fn forbidden(attrs: &Attributes) -> ApiError {
    let resource = match attrs.subresource.as_str() {
        "" => attrs.resource.clone(),
        sub => format!("{}/{sub}", attrs.resource),
    };
    let scope = match attrs.namespace.as_str() {
        "" => "at the cluster scope".to_string(),
        ns => format!("in the namespace \"{ns}\""),
    };
    let why = format!(
        "User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        attrs.user, attrs.verb, attrs.group
    );
    let qualified = match attrs.group.as_str() {
        "" => attrs.resource.clone(),
        group => format!("{}.{group}", attrs.resource),
    };
    let message = match attrs.name.as_str() {
        "" => format!("{qualified} is forbidden: {why}"),
        name => format!("{qualified} \"{name}\" is forbidden: {why}"),
    };
    let mut error = status(403, "Forbidden", message, None);
    let mut details = Map::new();
    if !attrs.name.is_empty() {
        details.insert("name".into(), json!(attrs.name));
    }
    if !attrs.group.is_empty() {
        details.insert("group".into(), json!(attrs.group));
    }
    details.insert("kind".into(), json!(attrs.resource));
    error.body["details"] = Value::Object(details);
    error
}

/// `RuleAllows` (plugin/pkg/auth/authorizer/rbac).
fn rule_allows(rule: &Value, attrs: &Attributes) -> bool {
    let verbs = strings(&rule["verbs"]);
    if !verbs.iter().any(|v| v == "*" || *v == attrs.verb) {
        return false;
    }
    if let Some(path) = &attrs.path {
        return strings(&rule["nonResourceURLs"]).iter().any(|u| {
            u == "*" || u == path || (u.ends_with('*') && path.starts_with(u.trim_end_matches('*')))
        });
    }
    let groups = strings(&rule["apiGroups"]);
    if !groups.iter().any(|g| g == "*" || *g == attrs.group) {
        return false;
    }
    let combined = if attrs.subresource.is_empty() {
        attrs.resource.clone()
    } else {
        format!("{}/{}", attrs.resource, attrs.subresource)
    };
    let resource_ok = strings(&rule["resources"]).iter().any(|r| {
        r == "*"
            || *r == combined
            || (!attrs.subresource.is_empty() && *r == format!("*/{}", attrs.subresource))
    });
    let names = strings(&rule["resourceNames"]);
    resource_ok && (names.is_empty() || names.contains(&attrs.name))
}

/// Whether a binding's subject is the user (`appliesToUser`), and how RBAC names it.
fn subject_matches(subject: &Value, attrs: &Attributes, binding_namespace: &str) -> Option<String> {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str().unwrap_or_default() {
        "User" if name == attrs.user => Some(format!("User \"{name}\"")),
        "Group" if attrs.groups.iter().any(|g| g == name) => Some(format!("Group \"{name}\"")),
        "ServiceAccount" => {
            let ns = subject["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_namespace);
            (!ns.is_empty() && attrs.user == format!("system:serviceaccount:{ns}:{name}"))
                .then(|| format!("ServiceAccount \"{name}/{ns}\""))
        }
        _ => None,
    }
}

impl Store {
    /// The authorizer chain of a kube-apiserver with `--authorization-mode=Node,RBAC`
    /// as far as the fake goes: `system:masters` is always allowed (no reason), then
    /// RBAC over the stored (Cluster)Roles and (Cluster)RoleBindings, which never
    /// denies, only allows or has no opinion.
    fn authorize(&self, attrs: &Attributes) -> (bool, String) {
        if attrs.groups.iter().any(|g| g == "system:masters") {
            return (true, String::new());
        }
        let of = |plural: &str, namespace: &str| -> Vec<&Value> {
            self.objects
                .iter()
                .filter(|(k, _)| {
                    k.group == "rbac.authorization.k8s.io"
                        && k.plural == plural
                        && k.namespace == namespace
                })
                .map(|(_, v)| v)
                .collect()
        };
        let role = |kind: &str, name: &str, namespace: &str| -> Option<&Value> {
            let (plural, ns) = if kind == "ClusterRole" {
                ("clusterroles", "")
            } else {
                ("roles", namespace)
            };
            of(plural, ns)
                .into_iter()
                .find(|r| r["metadata"]["name"] == name)
        };
        for binding in of("clusterrolebindings", "") {
            let role_ref = &binding["roleRef"];
            if role_ref["kind"] != "ClusterRole" {
                continue;
            }
            let role_name = role_ref["name"].as_str().unwrap_or_default();
            let Some(role) = role("ClusterRole", role_name, "") else {
                continue;
            };
            for subject in binding["subjects"].as_array().cloned().unwrap_or_default() {
                let Some(who) = subject_matches(&subject, attrs, "") else {
                    continue;
                };
                if role["rules"]
                    .as_array()
                    .is_some_and(|rules| rules.iter().any(|r| rule_allows(r, attrs)))
                {
                    return (
                        true,
                        format!(
                            "RBAC: allowed by ClusterRoleBinding \"{}\" of ClusterRole \"{role_name}\" to {who}",
                            field(binding, "metadata.name")
                        ),
                    );
                }
            }
        }
        if !attrs.namespace.is_empty() && attrs.path.is_none() {
            for binding in of("rolebindings", &attrs.namespace) {
                let role_ref = &binding["roleRef"];
                let kind = role_ref["kind"].as_str().unwrap_or_default();
                let role_name = role_ref["name"].as_str().unwrap_or_default();
                let Some(role) = role(kind, role_name, &attrs.namespace) else {
                    continue;
                };
                for subject in binding["subjects"].as_array().cloned().unwrap_or_default() {
                    let Some(who) = subject_matches(&subject, attrs, &attrs.namespace) else {
                        continue;
                    };
                    if role["rules"]
                        .as_array()
                        .is_some_and(|rules| rules.iter().any(|r| rule_allows(r, attrs)))
                    {
                        return (
                            true,
                            format!(
                                "RBAC: allowed by RoleBinding \"{}/{}\" of {kind} \"{role_name}\" to {who}",
                                field(binding, "metadata.name"),
                                attrs.namespace
                            ),
                        );
                    }
                }
            }
        }
        (false, String::new())
    }
}

/// POST /apis/authorization.k8s.io/v1/subjectaccessreviews
/// (pkg/registry/authorization/subjectaccessreview), validated as
/// ValidateSubjectAccessReviewSpec does.
fn subject_access_review(store: &Store, review: Value) -> Result<Reply, ApiError> {
    let spec = &review["spec"];
    let mut errors: Vec<(&str, String, String)> = vec![];
    let resource = &spec["resourceAttributes"];
    let non_resource = &spec["nonResourceAttributes"];
    if resource.is_object() && non_resource.is_object() {
        errors.push((
            "FieldValueInvalid",
            "spec.nonResourceAttributes".into(),
            format!("Invalid value: {non_resource}: cannot be specified in combination with resourceAttributes"),
        ));
    }
    if !resource.is_object() && !non_resource.is_object() {
        errors.push((
            "FieldValueInvalid",
            "spec.resourceAttributes".into(),
            "Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified".into(),
        ));
    }
    let user = spec["user"].as_str().unwrap_or_default().to_string();
    let groups = strings(&spec["groups"]);
    if user.is_empty() && groups.is_empty() {
        errors.push((
            "FieldValueInvalid",
            "spec.user".into(),
            "Invalid value: \"\": at least one of user or group must be specified".into(),
        ));
    }
    if !errors.is_empty() {
        return Err(invalid_all(
            "SubjectAccessReview",
            "authorization.k8s.io",
            "",
            &errors,
        ));
    }
    let text = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    let attrs = if resource.is_object() {
        Attributes {
            user,
            groups,
            verb: text(resource, "verb"),
            namespace: text(resource, "namespace"),
            group: text(resource, "group"),
            resource: text(resource, "resource"),
            subresource: text(resource, "subresource"),
            name: text(resource, "name"),
            path: None,
        }
    } else {
        Attributes {
            user,
            groups,
            verb: text(non_resource, "verb"),
            namespace: String::new(),
            group: String::new(),
            resource: String::new(),
            subresource: String::new(),
            name: String::new(),
            path: Some(text(non_resource, "path")),
        }
    };
    let (allowed, reason) = store.authorize(&attrs);
    let mut result = json!({"allowed": allowed});
    if !reason.is_empty() {
        result["reason"] = json!(reason);
    }
    Ok(review_reply(
        review.clone(),
        "authorization.k8s.io/v1",
        "SubjectAccessReview",
        result,
    ))
}
