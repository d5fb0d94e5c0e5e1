//! The kubelet HTTPS API: TLS, the caller's identity, and the routes. Every request is
//! authenticated and authorized before anything reaches an agent.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use super::auth::{self, Authorizer, UserInfo};
use super::channel::{self, StreamProtocol};
use super::exec::{self, ExecOptions};
use super::port_forward;
use super::relay;
use super::stats::{self, Rates, Sample};
use super::tls::client_identity;
use crate::audit::{self, Outcome};
use crate::mesh::MeshHandle;
use crate::node::NodeDirectory;
use crate::wire::{KubeletRequest, PodUsage};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} for the kubelet API")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Who is calling: the user a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: Option<String>,
    pub groups: Vec<String>,
}

/// What the routes need.
#[derive(Clone)]
pub struct Context {
    pub directory: NodeDirectory,
    pub mesh: MeshHandle,
    pub authorizer: Arc<dyn Authorizer>,
    pub node_name: String,
    pub started: Timestamp,
    /// CPU rates between Summary API calls.
    pub rates: Arc<std::sync::Mutex<Rates>>,
    /// For the audit trail of kubelet API requests.
    pub metrics: crate::metrics::Metrics,
}

/// Binds the port (failing at once if it cannot), then serves until cancelled.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// A client that has not finished its TLS handshake by then is dropped: a peer that
/// opens connections and stays silent costs a socket and a task each.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers must have arrived by then (slowloris); it is also how long an
/// idle keep-alive connection waits for its next request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections one client address may hold at once (each HTTP/1 connection carries one
/// request or stream at a time): ample for an API server relaying every user's logs,
/// exec and port-forward, and a bound on what one host can hold open.
const CONNECTIONS_PER_CLIENT: usize = 256;

/// Open connections per client address; an address with none is forgotten.
#[derive(Clone, Default)]
struct ClientSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection's place in [`ClientSlots`], given back when dropped.
struct ClientSlot {
    slots: ClientSlots,
    client: IpAddr,
}

impl ClientSlots {
    fn take(&self, client: IpAddr) -> Option<ClientSlot> {
        let mut open = self.0.lock().ok()?;
        let count = open.entry(client).or_default();
        if *count >= CONNECTIONS_PER_CLIENT {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            slots: self.clone(),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.slots.0.lock() {
            if let Some(count) = open.get_mut(&self.client) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    open.remove(&self.client);
                }
            }
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    context: Context,
    cancel: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = ClientSlots::default();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "kubelet API accept failed");
                    continue;
                }
            },
        };
        // As Go sets on every connection (the kubelet's too): interactive streams and
        // the small frames of the k3s tunnel must not wait for delayed ACKs.
        let _ = tcp.set_nodelay(true);
        let Some(slot) = slots.take(peer.ip()) else {
            context
                .metrics
                .dropped("kubelet_connection", "per_client_limit");
            tracing::debug!(%peer, "client holds {CONNECTIONS_PER_CLIENT} connections already; refused");
            continue;
        };
        let acceptor = acceptor.clone();
        let context = context.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake not done in time; connection dropped");
                    return;
                }
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(client_identity);
            let caller = Caller {
                user: identity.as_ref().map(|(user, _)| user.clone()),
                groups: identity.map(|(_, groups)| groups).unwrap_or_default(),
            };
            let plain = warp::service(routes(context.clone(), caller.clone()));
            // Streaming requests need the raw upgrade, which warp's filters do not give.
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let mut plain = plain.clone();
                let context = context.clone();
                let caller = caller.clone();
                async move {
                    let path = request.uri().path();
                    if path.starts_with("/exec/") || path.starts_with("/attach/") {
                        Ok(exec_request(request, &context, &caller).await)
                    } else if path.starts_with("/portForward/") {
                        Ok(port_forward_request(request, &context, &caller).await)
                    } else {
                        tower_service::Service::call(&mut plain, request).await
                    }
                }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "kubelet API connection ended");
            }
        });
    }
}

fn text(code: StatusCode, message: impl Into<String>) -> warp::reply::Response {
    warp::reply::with_status(message.into(), code).into_response()
}

/// The routes for one connection's caller.
fn routes(
    context: Context,
    caller: Caller,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    let with_context = warp::any().map(move || context.clone());
    let authorized = warp::method()
        .and(warp::path::full())
        .and(warp::header::optional::<String>("authorization"))
        .and(with_context.clone())
        .and_then(
            move |method: warp::http::Method,
                  path: warp::path::FullPath,
                  authorization: Option<String>,
                  context: Context| {
                let caller = caller.clone();
                async move {
                    authorize(
                        &context,
                        &caller,
                        method.as_str(),
                        path.as_str(),
                        authorization,
                    )
                    .await
                    .map_err(warp::reject::custom)
                }
            },
        );
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| text(StatusCode::OK, "ok"));
    let pods = warp::path!("pods")
        .and(warp::get())
        .and(with_context.clone())
        .then(|context: Context| async move {
            let items = context.directory.pods().await;
            let list = serde_json::json!({
                "kind": "PodList",
                "apiVersion": "v1",
                "metadata": {},
                "items": items,
            });
            warp::reply::json(&list).into_response()
        });
    let logs = warp::path!("containerLogs" / String / String / String)
        .and(warp::get())
        .and(warp::query::<HashMap<String, String>>())
        .and(with_context.clone())
        .then(
            |namespace: String,
             pod: String,
             container: String,
             query: HashMap<String, String>,
             context: Context| async move {
                container_logs(context, &namespace, &pod, &container, &query).await
            },
        );
    let summary = warp::path!("stats" / "summary")
        .and(warp::get())
        .and(with_context.clone())
        .then(|context: Context| async move {
            let sample = sample(&context).await;
            let rates = match context.rates.lock() {
                Ok(mut rates) => rates.update(&sample),
                Err(_) => Default::default(),
            };
            let body = stats::summary(&context.node_name, context.started, &sample, &rates);
            warp::reply::json(&body).into_response()
        });
    let resource_metrics = warp::path!("metrics" / "resource")
        .and(warp::get())
        .and(with_context.clone())
        .then(|context: Context| async move {
            let body = stats::resource_metrics(&sample(&context).await);
            let mut reply = text(StatusCode::OK, body);
            reply.headers_mut().insert(
                warp::http::header::CONTENT_TYPE,
                warp::http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            reply
        });
    let routes = healthz
        .or(pods)
        .unify()
        .or(logs)
        .unify()
        .or(summary)
        .unify()
        .or(resource_metrics)
        .unify();
    authorized
        .and(routes)
        .map(|_user: UserInfo, reply: warp::reply::Response| reply)
        .recover(|rejection: Rejection| async move {
            if let Some(Denied(code, message)) = rejection.find::<Denied>() {
                return Ok::<_, Rejection>(text(*code, message.clone()));
            }
            if rejection.is_not_found() {
                return Ok(text(StatusCode::NOT_FOUND, "404 page not found"));
            }
            Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"))
        })
        .unify()
}

/// A refused request: 401, 403, or 500 when the API server could not be asked.
#[derive(Debug)]
struct Denied(StatusCode, String);
impl warp::reject::Reject for Denied {}

/// Authenticates the caller (client certificate, else bearer token) and authorizes the
/// request, with the kubelet's answers.
async fn authorize(
    context: &Context,
    caller: &Caller,
    method: &str,
    path: &str,
    authorization: Option<String>,
) -> Result<UserInfo, Denied> {
    let unauthorized = || Denied(StatusCode::UNAUTHORIZED, "Unauthorized".into());
    let user = match (&caller.user, authorization) {
        (Some(name), _) => UserInfo {
            name: name.clone(),
            groups: caller.groups.clone(),
            uid: None,
        },
        (None, Some(header)) => {
            let token = header.strip_prefix("Bearer ").ok_or_else(unauthorized)?;
            match context.authorizer.authenticate(token.trim()).await {
                Ok(Some(user)) => user,
                Ok(None) => return Err(unauthorized()),
                Err(e) => {
                    tracing::warn!(error = %e, "token review failed");
                    return Err(unauthorized());
                }
            }
        }
        (None, None) => return Err(unauthorized()),
    };
    let attributes = auth::attributes(method, path);
    let described = format!(
        "(user={}, verb={}, resource=nodes, subresource={})",
        user.name, attributes.verb, attributes.subresource
    );
    let audit = |outcome| {
        audit::record(
            &context.metrics,
            "kubelet_api",
            outcome,
            &user.name,
            None,
            &format_args!("{method} {path}"),
        )
    };
    match context.authorizer.allowed(&user, attributes).await {
        Ok(true) => {
            audit(Outcome::Allowed);
            Ok(user)
        }
        Ok(false) => {
            audit(Outcome::Refused);
            Err(Denied(
                StatusCode::FORBIDDEN,
                format!("Forbidden {described}"),
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "subject access review failed");
            Err(Denied(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Authorization error {described}"),
            ))
        }
    }
}

/// The kubelet's log query, as parsed and checked by its own handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    pub follow: bool,
    pub tail_lines: Option<u64>,
    pub timestamps: bool,
    /// Unix seconds.
    pub since: Option<i64>,
    pub limit_bytes: Option<u64>,
    pub previous: bool,
}

impl LogQuery {
    pub fn parse(query: &HashMap<String, String>, now: Timestamp) -> Result<LogQuery, String> {
        let flag = |name: &str| -> Result<bool, String> {
            match query.get(name).map(String::as_str) {
                None | Some("" | "false" | "0") => Ok(false),
                Some("true" | "1") => Ok(true),
                Some(other) => Err(format!("{name}: invalid boolean {other:?}")),
            }
        };
        let number = |name: &str, min: i64| -> Result<Option<i64>, String> {
            query
                .get(name)
                .map(|v| match v.parse::<i64>() {
                    Ok(n) if n >= min => Ok(n),
                    _ => Err(format!(
                        "{name}: must be an integer of at least {min}, not {v:?}"
                    )),
                })
                .transpose()
        };
        let since_seconds = number("sinceSeconds", 1)?;
        let since_time = query
            .get("sinceTime")
            .map(|t| {
                t.parse::<Timestamp>()
                    .map(|t| t.as_second())
                    .map_err(|_| format!("sinceTime: not an RFC 3339 time: {t:?}"))
            })
            .transpose()?;
        if since_seconds.is_some() && since_time.is_some() {
            return Err("at most one of sinceTime or sinceSeconds may be specified".into());
        }
        Ok(LogQuery {
            follow: flag("follow")?,
            tail_lines: number("tailLines", 0)?.map(|n| n.unsigned_abs()),
            timestamps: flag("timestamps")?,
            since: since_time.or(since_seconds.map(|s| now.as_second() - s)),
            limit_bytes: number("limitBytes", 1)?.map(|n| n.unsigned_abs()),
            previous: flag("previous")?,
        })
    }
}

async fn container_logs(
    context: Context,
    namespace: &str,
    pod: &str,
    container: &str,
    query: &HashMap<String, String>,
) -> warp::reply::Response {
    let query = match LogQuery::parse(query, Timestamp::now()) {
        Ok(query) => query,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let (pod_uid, agent) = match locate_container(&context, namespace, pod, container).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let request = KubeletRequest::Logs {
        pod: pod_uid,
        container: container.to_owned(),
        follow: query.follow,
        tail_lines: query.tail_lines,
        timestamps: query.timestamps,
        since: query.since,
        previous: query.previous,
    };
    let io = match relay::request_agent(&context.mesh, agent, &request).await {
        Ok(io) => io,
        Err((code, message)) => return text(status_code(code), message),
    };
    let body = limited(pump(io), query.limit_bytes);
    let mut reply = warp::reply::stream(body).into_response();
    reply.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/plain"),
    );
    reply
}

/// The relayed bytes as a body stream. A task reads the stream (which is not `Sync`, as
/// response bodies must be) into a small channel, so a slow client slows the agent.
fn pump(
    io: impl tokio::io::AsyncRead + Send + Unpin + 'static,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Sync + 'static {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(RELAY_CHUNKS_IN_FLIGHT);
    tokio::spawn(async move {
        let mut chunks = tokio_util::io::ReaderStream::new(io);
        while let Some(chunk) = chunks.next().await {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Chunks read ahead of a slow client.
const RELAY_CHUNKS_IN_FLIGHT: usize = 8;

/// `/exec/{namespace}/{pod}/{container}` and `/attach/...` upgraded to SPDY/3.1 or
/// WebSocket, as the API server sends them: checked (caller, pod, container, options, protocol) before the upgrade, then
/// bridged to an exec session on the pod's agent.
async fn exec_request(
    mut request: Request<Incoming>,
    context: &Context,
    caller: &Caller,
) -> warp::reply::Response {
    if let Err(refused) = authorize_upgrade(&request, context, caller).await {
        return refused;
    }
    let header = |name: &str| header_values(&request, name);
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [kind @ ("exec" | "attach"), namespace, pod, container] = segments.as_slice() else {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    };
    let attach = *kind == "attach";
    let options = match ExecOptions::parse(request.uri().query().unwrap_or_default(), attach) {
        Ok(options) => options,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let upgrade = header("upgrade");
    let transport = if upgrade.iter().any(|u| u.eq_ignore_ascii_case("websocket")) {
        let Some(key) = header("sec-websocket-key").first().map(|k| k.to_string()) else {
            return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
        };
        let offered = channel::offered_protocols(header("sec-websocket-protocol"));
        let supported: Vec<&str> = StreamProtocol::ALL.iter().map(|p| p.name()).collect();
        match channel::negotiate_websocket(&offered, &supported) {
            Ok(name) => Transport::WebSocket {
                key,
                protocol: name,
            },
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        }
    } else if upgrade.iter().any(|u| u.eq_ignore_ascii_case("SPDY/3.1")) {
        let offered = channel::offered_protocols(header("x-stream-protocol-version"));
        match channel::negotiate_stream_protocol(&offered, &exec::SPDY_PROTOCOLS) {
            Ok(name) => Transport::Spdy { protocol: name },
            Err(e @ channel::NegotiationError::Missing) => {
                return text(StatusCode::BAD_REQUEST, e.to_string())
            }
            Err(e) => return text(StatusCode::FORBIDDEN, e.to_string()),
        }
    } else {
        return text(StatusCode::BAD_REQUEST, "Upgrade request required");
    };
    let (pod_uid, agent) = match locate_container(context, namespace, pod, container).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    let container = (*container).to_owned();
    let relayed = if attach {
        KubeletRequest::Attach {
            pod: pod_uid,
            container,
            streams: options.streams,
        }
    } else {
        KubeletRequest::Exec {
            pod: pod_uid,
            container,
            command: options.command.clone(),
            streams: options.streams,
        }
    };
    let agent_io = match relay::request_agent(&context.mesh, agent, &relayed).await {
        Ok(io) => io,
        Err((code, message)) => return text(status_code(code), message),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let reply = switching_protocols(&transport);
    let protocol_name = match &transport {
        Transport::Spdy { protocol } | Transport::WebSocket { protocol, .. } => *protocol,
    };
    let protocol = StreamProtocol::from_name(protocol_name).unwrap_or(StreamProtocol::V4);
    let websocket = matches!(transport, Transport::WebSocket { .. });
    tokio::spawn(async move {
        let Some(upgraded) = upgraded(on_upgrade).await else {
            return;
        };
        if websocket {
            exec::serve_websocket(server_websocket(upgraded).await, protocol, agent_io).await;
        } else {
            exec::serve_spdy(upgraded, protocol, options, agent_io).await;
        }
    });
    reply
}

/// `/portForward/{namespace}/{pod}` upgraded to SPDY/3.1 (`portforward.k8s.io`), to
/// WebSocket carrying SPDY (`SPDY/3.1+portforward.k8s.io`), or to WebSocket channels
/// (`v4.channel.k8s.io`, with the ports in `?port=`).
async fn port_forward_request(
    mut request: Request<Incoming>,
    context: &Context,
    caller: &Caller,
) -> warp::reply::Response {
    if let Err(refused) = authorize_upgrade(&request, context, caller).await {
        return refused;
    }
    let header = |name: &str| header_values(&request, name);
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["portForward", namespace, pod] = segments.as_slice() else {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    };
    let upgrade = header("upgrade");
    // Set for WebSocket channels: the requested ports.
    let mut port_channels = None;
    let transport = if upgrade.iter().any(|u| u.eq_ignore_ascii_case("websocket")) {
        let offered = channel::offered_protocols(header("sec-websocket-protocol"));
        let Some(key) = header("sec-websocket-key").first().map(|k| k.to_string()) else {
            return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
        };
        let protocol = if offered.contains(&channel::PORT_FORWARD_TUNNEL_PROTOCOL) {
            channel::PORT_FORWARD_TUNNEL_PROTOCOL
        } else {
            let protocol = match channel::negotiate_websocket(
                &offered,
                channel::PORT_FORWARD_WEBSOCKET_PROTOCOLS,
            ) {
                Ok(protocol) => protocol,
                Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
            };
            let ports = port_query(request.uri().query().unwrap_or_default()).and_then(|values| {
                channel::parse_ports(values.iter().map(String::as_str))
                    .and_then(channel::PortForwardChannels::new)
                    .map_err(|e| e.to_string())
            });
            match ports {
                Ok(channels) => port_channels = Some(channels),
                Err(e) => return text(StatusCode::BAD_REQUEST, e),
            }
            protocol
        };
        Transport::WebSocket { key, protocol }
    } else if upgrade.iter().any(|u| u.eq_ignore_ascii_case("SPDY/3.1")) {
        let offered = channel::offered_protocols(header("x-stream-protocol-version"));
        match channel::negotiate_stream_protocol(&offered, &[channel::PORT_FORWARD_PROTOCOL]) {
            Ok(protocol) => Transport::Spdy { protocol },
            Err(e @ channel::NegotiationError::Missing) => {
                return text(StatusCode::BAD_REQUEST, e.to_string())
            }
            Err(e) => return text(StatusCode::FORBIDDEN, e.to_string()),
        }
    } else {
        return text(StatusCode::BAD_REQUEST, "Upgrade request required");
    };
    let Some(location) = context.directory.locate(namespace, pod).await else {
        return text(StatusCode::NOT_FOUND, format!("pod {pod:?} does not exist"));
    };
    let Some(agent) = location.agent else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("pod {pod:?} is not running"),
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let reply = switching_protocols(&transport);
    let websocket = matches!(transport, Transport::WebSocket { .. });
    let mesh = context.mesh.clone();
    let pod_uid = location.pod.uid;
    tokio::spawn(async move {
        let Some(upgraded) = upgraded(on_upgrade).await else {
            return;
        };
        if let Some(channels) = port_channels {
            let websocket = server_websocket(upgraded).await;
            port_forward::serve_channels(websocket, channels, mesh, agent, pod_uid).await;
        } else if websocket {
            use futures::{SinkExt, StreamExt};
            use tokio_tungstenite::tungstenite::{Error as WsError, Message};
            // SPDY frames ride in binary messages; a close message ends the stream.
            let messages = server_websocket(upgraded)
                .await
                .with(
                    |bytes: Vec<u8>| async move { Ok::<_, WsError>(Message::Binary(bytes.into())) },
                )
                .take_while(|m| std::future::ready(!matches!(m, Ok(Message::Close(_)))))
                .filter_map(|m| async move {
                    match m {
                        Ok(Message::Binary(bytes)) => Some(Ok(bytes.to_vec())),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    }
                });
            let io = channel::MessageIo::new(Box::pin(messages));
            port_forward::serve(io, mesh, agent, pod_uid).await;
        } else {
            port_forward::serve(upgraded, mesh, agent, pod_uid).await;
        }
    });
    reply
}

/// The values of the `port` query parameters, percent-decoded.
fn port_query(query: &str) -> Result<Vec<String>, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(key, _)| *key == "port")
        .map(|(_, value)| exec::percent_decode(value))
        .collect()
}

/// The pod's UID and agent for a request about one of its containers, or the kubelet's
/// answer for an unknown pod or container, or one not started yet.
async fn locate_container(
    context: &Context,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<(crate::wire::PodUid, libp2p::PeerId), warp::reply::Response> {
    let Some(location) = context.directory.locate(namespace, pod).await else {
        return Err(text(
            StatusCode::NOT_FOUND,
            format!("pod {pod:?} does not exist"),
        ));
    };
    if !location.containers.iter().any(|c| c == container) {
        return Err(text(
            StatusCode::NOT_FOUND,
            format!("container {container:?} not found in pod {pod:?}"),
        ));
    }
    match location.agent {
        Some(agent) => Ok((location.pod.uid, agent)),
        None => Err(text(
            StatusCode::BAD_REQUEST,
            format!(
                "container {container:?} in pod {pod:?} is waiting to start: ContainerCreating"
            ),
        )),
    }
}

/// Every value of a request header, as text.
fn header_values<'r>(request: &'r Request<Incoming>, name: &str) -> Vec<&'r str> {
    request
        .headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect()
}

/// The caller check of the streaming endpoints (which warp's filters do not reach).
async fn authorize_upgrade(
    request: &Request<Incoming>,
    context: &Context,
    caller: &Caller,
) -> Result<(), warp::reply::Response> {
    let authorization = header_values(request, "authorization")
        .first()
        .map(|s| s.to_string());
    let method = request.method().as_str();
    authorize(context, caller, method, request.uri().path(), authorization)
        .await
        .map(drop)
        .map_err(|Denied(code, message)| text(code, message))
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// The connection once the 101 has gone out; None (logged) if the upgrade failed.
async fn upgraded(on_upgrade: hyper::upgrade::OnUpgrade) -> Option<Upgraded> {
    match on_upgrade.await {
        Ok(upgraded) => Some(TokioIo::new(upgraded)),
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            None
        }
    }
}

/// The server side of a WebSocket whose handshake the 101 completed.
async fn server_websocket(io: Upgraded) -> tokio_tungstenite::WebSocketStream<Upgraded> {
    tokio_tungstenite::WebSocketStream::from_raw_socket(
        io,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        None,
    )
    .await
}

/// The 101 answer for an agreed upgrade.
fn switching_protocols(transport: &Transport) -> warp::reply::Response {
    let mut reply = text(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = reply.headers_mut();
    let value = warp::http::HeaderValue::from_static;
    headers.insert(warp::http::header::CONNECTION, value("Upgrade"));
    match transport {
        Transport::Spdy { protocol } => {
            headers.insert(warp::http::header::UPGRADE, value("SPDY/3.1"));
            headers.insert("X-Stream-Protocol-Version", value(protocol));
        }
        Transport::WebSocket { key, protocol } => {
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            headers.insert(warp::http::header::UPGRADE, value("websocket"));
            if let Ok(accept) = warp::http::HeaderValue::from_str(&accept) {
                headers.insert(warp::http::header::SEC_WEBSOCKET_ACCEPT, accept);
            }
            if !protocol.is_empty() {
                headers.insert(warp::http::header::SEC_WEBSOCKET_PROTOCOL, value(protocol));
            }
        }
    }
    reply
}

/// How a streaming client asked to upgrade, with the protocol agreed on.
enum Transport {
    Spdy { protocol: &'static str },
    WebSocket { key: String, protocol: &'static str },
}

/// How long the agents get to report their usage.
const STATS_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of one agent's usage report.
const MAX_STATS_BYTES: u64 = 4 * 1024 * 1024;

/// Usage of the node's pods, asked of every agent that runs some; an agent that does
/// not answer in time is left out (and logged).
async fn sample(context: &Context) -> Sample {
    let agents = context.directory.agents().await;
    let asks = agents.into_iter().map(|agent| async move {
        let asked = tokio::time::timeout(STATS_TIMEOUT, agent_usage(&context.mesh, agent)).await;
        match asked {
            Ok(Ok(pods)) => pods,
            Ok(Err(e)) => {
                tracing::warn!(%agent, error = %e, "no usage from agent");
                Vec::new()
            }
            Err(_) => {
                tracing::warn!(%agent, "agent did not report its usage in time");
                Vec::new()
            }
        }
    });
    let pods = futures::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect();
    Sample {
        at: Timestamp::now(),
        pods,
    }
}

async fn agent_usage(mesh: &MeshHandle, agent: libp2p::PeerId) -> Result<Vec<PodUsage>, String> {
    use tokio::io::AsyncReadExt;
    let io = relay::request_agent(mesh, agent, &KubeletRequest::Stats)
        .await
        .map_err(|(_, message)| message)?;
    let mut body = Vec::new();
    io.take(MAX_STATS_BYTES)
        .read_to_end(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// An HTTP status from a relayed code (500 if it is not one).
fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// Ends the stream after `limit` bytes, as the kubelet's limitBytes does.
fn limited<S>(
    stream: S,
    limit: Option<u64>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Sync + 'static
where
    S: futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Sync + 'static,
{
    use futures::StreamExt;
    let mut left = limit.unwrap_or(u64::MAX);
    stream
        .take_while(move |_| {
            let more = left > 0;
            async move { more }
        })
        .map(move |chunk| {
            chunk.map(|mut bytes| {
                let keep = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                bytes.truncate(keep);
                left -= keep as u64;
                bytes
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_address_holds_a_bounded_number_of_connections() {
        let slots = ClientSlots::default();
        let (alice, bob): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let held: Vec<ClientSlot> = (0..CONNECTIONS_PER_CLIENT)
            .map(|_| slots.take(alice).expect("a slot"))
            .collect();
        assert!(slots.take(alice).is_none(), "one past the cap");
        let other = slots.take(bob).expect("another client is not affected");
        drop(held);
        assert!(
            slots.take(alice).is_some(),
            "closed connections free their slots"
        );
        drop(other);
        let open = slots.0.lock().expect("lock");
        assert!(
            open.is_empty(),
            "clients without connections are forgotten: {open:?}"
        );
    }
}
