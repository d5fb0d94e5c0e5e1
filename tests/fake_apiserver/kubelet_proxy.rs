//! Pod subresources the API server serves by talking to the pod's kubelet
//! (pkg/registry/core/pod/rest/subresources.go and log.go, locations from
//! pkg/registry/core/pod/strategy.go, the node's address from
//! pkg/kubelet/client/kubelet_client.go): `log` through a plain GET (LocationStreamer),
//! `exec`, `attach` and `portforward` through the upgrade-aware proxy, which passes the
//! client's upgrade request (SPDY/3.1 or WebSocket) to the kubelet and, once the kubelet
//! answers 101, copies bytes both ways until either side closes.
//!
//! In k3s mode the connection to the kubelet may go through an agent's tunnel session
//! (see [`K3sRouting`]); the TLS to the kubelet runs inside it, unchanged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::Reply as _;

use super::tunnel::TunnelConn;
use super::{
    not_found, status, url_pairs, ApiError, Frontend, K3sRouting, Reply, RequestRecord, Resource,
    Store, Target,
};

/// `/api/v1/namespaces/{ns}/pods/{name}/{log|exec|attach|portforward}`.
pub(super) fn connect_target(path: &str) -> Option<(String, String, String)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, sub]
            if matches!(*sub, "log" | "exec" | "attach" | "portforward") =>
        {
            Some((
                super::percent_decode(ns),
                super::percent_decode(name),
                sub.to_string(),
            ))
        }
        _ => None,
    }
}

/// Where a request goes on the kubelet.
struct Location {
    host: String,
    port: u16,
    path_and_query: String,
}

impl Location {
    /// `net.JoinHostPort`.
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Go's `url.QueryEscape`.
fn query_escape(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Go's `url.Values.Encode`: keys sorted, values in order.
fn encode(values: &BTreeMap<&str, Vec<String>>) -> String {
    values
        .iter()
        .flat_map(|(k, vs)| {
            vs.iter()
                .map(move |v| format!("{}={}", query_escape(k), query_escape(v)))
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A query parameter decoded into a bool as the API server's conversion does: absent is
/// false, "0" and "false" are false, anything else (even empty) is true.
fn flag(params: &[(String, String)], key: &str) -> bool {
    params
        .iter()
        .find(|(k, _)| k == key)
        .is_some_and(|(_, v)| v != "0" && !v.eq_ignore_ascii_case("false"))
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn bad_request(message: String) -> ApiError {
    status(400, "BadRequest", message, None)
}

/// A Go error that is not an API status: 500 with no reason, the error as the message.
fn internal(message: String) -> ApiError {
    status(500, "", message, None)
}

fn container_names(pod: &Value, list: &str) -> Vec<String> {
    pod["spec"][list]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `validateContainer` / the container choice in `streamLocation`.
fn choose_container(pod: &Value, name: &str, wanted: Option<&str>) -> Result<String, ApiError> {
    let containers = container_names(pod, "containers");
    match wanted.filter(|w| !w.is_empty()) {
        None => match containers.len() {
            1 => Ok(containers[0].clone()),
            0 => Err(bad_request(format!(
                "a container name must be specified for pod {name}"
            ))),
            _ => {
                let mut message = format!(
                    "a container name must be specified for pod {name}, choose one of: [{}]",
                    containers.join(" ")
                );
                let init = container_names(pod, "initContainers");
                if !init.is_empty() {
                    message += &format!(" or one of the init containers: [{}]", init.join(" "));
                }
                let ephemeral = container_names(pod, "ephemeralContainers");
                if !ephemeral.is_empty() {
                    message += &format!(
                        " or one of the ephemeral containers: [{}]",
                        ephemeral.join(" ")
                    );
                }
                Err(bad_request(message))
            }
        },
        Some(container) => {
            let known = ["containers", "initContainers", "ephemeralContainers"]
                .iter()
                .any(|list| container_names(pod, list).iter().any(|c| c == container));
            if known {
                Ok(container.to_string())
            } else {
                Err(bad_request(format!(
                    "container {container} is not valid for pod {name}"
                )))
            }
        }
    }
}

/// `NodeConnectionInfoGetter.GetConnectionInfo`: the node's preferred address and its
/// kubelet port (10250 when the node reports none).
fn node_location(
    store: &Store,
    node_name: &str,
    mode: Option<K3sRouting>,
) -> Result<(String, u16), ApiError> {
    let nodes = Resource::find("", "v1", "nodes").expect("nodes");
    let Some(node) = store.objects.get(&Store::key(&nodes, "", node_name)) else {
        return Err(not_found(&nodes, node_name));
    };
    let addresses = node["status"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // The fake prefers InternalIP (current k3s passes
    // --kubelet-preferred-address-types=InternalIP,ExternalIP,Hostname). A real API
    // server's default is Hostname, InternalDNS, InternalIP, ExternalDNS, ExternalIP:
    // Hostname first, as the k3s v1.21 the fixtures come from ran (see
    // shared/fixtures/README.md: a Hostname that does not resolve breaks every logs/exec
    // request there), and as K3sRouting::V121 does.
    let order = match mode {
        Some(K3sRouting::V121) => [
            "Hostname",
            "InternalDNS",
            "InternalIP",
            "ExternalDNS",
            "ExternalIP",
        ],
        _ => [
            "InternalIP",
            "Hostname",
            "InternalDNS",
            "ExternalDNS",
            "ExternalIP",
        ],
    };
    let host = order.iter().find_map(|ty| {
        addresses
            .iter()
            .find(|a| a["type"] == *ty)
            .and_then(|a| a["address"].as_str())
            .filter(|a| !a.is_empty())
            .map(str::to_string)
    });
    let Some(host) = host else {
        let known: Vec<String> = addresses
            .iter()
            .map(|a| {
                format!(
                    "{{{} {}}}",
                    a["type"].as_str().unwrap_or_default(),
                    a["address"].as_str().unwrap_or_default()
                )
            })
            .collect();
        return Err(internal(format!(
            "no preferred addresses found; known addresses: [{}]",
            known.join(" ")
        )));
    };
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .filter(|p| *p > 0 && *p < 65536)
        .unwrap_or(10250) as u16;
    Ok((host, port))
}

/// The kubelet location of a pod subresource, or None for the logs of an unbound pod
/// (which the API server answers with an empty stream).
fn locate(
    store: &Store,
    namespace: &str,
    name: &str,
    sub: &str,
    params: &[(String, String)],
    mode: Option<K3sRouting>,
) -> Result<Option<Location>, ApiError> {
    let pods = Resource::find("", "v1", "pods").expect("pods");
    let Some(pod) = store.objects.get(&Store::key(&pods, namespace, name)) else {
        return Err(not_found(&pods, name));
    };
    let node_name = super::field(pod, "spec.nodeName");
    let mut query: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let path = match sub {
        "log" => {
            let container = choose_container(pod, name, param(params, "container"))?;
            if node_name.is_empty() {
                return Ok(None);
            }
            for key in ["follow", "previous", "timestamps"] {
                if flag(params, key) {
                    query.insert(key, vec!["true".into()]);
                }
            }
            for key in ["sinceSeconds", "sinceTime", "tailLines", "limitBytes"] {
                if let Some(v) = param(params, key) {
                    query.insert(key, vec![v.to_string()]);
                }
            }
            format!("/containerLogs/{namespace}/{name}/{container}")
        }
        "exec" | "attach" => {
            let container = choose_container(pod, name, param(params, "container"))?;
            if node_name.is_empty() {
                return Err(bad_request(format!(
                    "pod {name} does not have a host assigned"
                )));
            }
            for (key, param_name) in [
                ("stdin", "input"),
                ("stdout", "output"),
                ("stderr", "error"),
                ("tty", "tty"),
            ] {
                if flag(params, key) {
                    query.insert(param_name, vec!["1".into()]);
                }
            }
            if sub == "exec" {
                let commands: Vec<String> = params
                    .iter()
                    .filter(|(k, _)| k == "command")
                    .map(|(_, v)| v.clone())
                    .collect();
                if !commands.is_empty() {
                    query.insert("command", commands);
                }
            }
            format!("/{sub}/{namespace}/{name}/{container}")
        }
        _ => {
            if node_name.is_empty() {
                return Err(bad_request(format!(
                    "pod {name} does not have a host assigned"
                )));
            }
            let ports: Vec<String> = params
                .iter()
                .filter(|(k, _)| k == "ports")
                .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
                .collect();
            if !ports.is_empty() {
                query.insert("port", ports);
            }
            format!("/portForward/{namespace}/{name}")
        }
    };
    let (host, port) = node_location(store, &node_name, mode)?;
    let query = encode(&query);
    let path_and_query = if query.is_empty() {
        path
    } else {
        format!("{path}?{query}")
    };
    Ok(Some(Location {
        host,
        port,
        path_and_query,
    }))
}

/// Where the k3s supervisor's `dialBackend` (pkg/daemons/control/tunnel.go) sends a
/// connection, decided from the nodes as its node watch sees them.
#[derive(Debug, Clone)]
struct Backend {
    /// The node the address belongs to, if any.
    node: Option<String>,
    /// A kubelet port on a node's address, or a node by name: tunnelled to the node's
    /// loopback.
    to_kubelet: bool,
    /// Whether the tunnel may be used at all.
    use_tunnel: bool,
}

/// `config.StreamServerPort`: also reached through the tunnel on a node's address.
const STREAM_SERVER_PORT: u16 = 10010;

/// `dialBackend`'s choice. An IP is looked up among the nodes' InternalIP and ExternalIP
/// addresses (a real server keeps one entry per IP, the node seen last; the fake, whose
/// test nodes often share 127.0.0.1, prefers the node whose kubelet port this is); a
/// kubelet (or stream server) port there goes to that node's kubelet, another port only
/// through the tunnel if the node has the `egress.k3s.io/cluster` label. A name is a
/// node's name.
fn backend(store: &Store, host: &str, port: u16) -> Backend {
    if host.parse::<std::net::IpAddr>().is_err() {
        return Backend {
            node: Some(host.to_string()),
            to_kubelet: true,
            use_tunnel: true,
        };
    }
    let mut candidates: Vec<(&Value, u16, u64)> = store
        .objects
        .iter()
        .filter(|(k, _)| k.group.is_empty() && k.plural == "nodes")
        .map(|(_, node)| node)
        .filter(|node| node["metadata"]["deletionTimestamp"].is_null())
        .filter(|node| {
            node["status"]["addresses"].as_array().is_some_and(|list| {
                list.iter().any(|a| {
                    (a["type"] == "InternalIP" || a["type"] == "ExternalIP")
                        && a["address"].as_str() == Some(host)
                })
            })
        })
        .map(|node| {
            let kubelet_port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
                .as_u64()
                .unwrap_or(0) as u16;
            let rv = super::field(node, "metadata.resourceVersion")
                .parse::<u64>()
                .unwrap_or(0);
            (node, kubelet_port, rv)
        })
        .collect();
    // The node whose kubelet this is first, then the most recently written.
    candidates.sort_by_key(|(_, kubelet_port, rv)| {
        (
            *kubelet_port == 0 || (port != *kubelet_port && port != STREAM_SERVER_PORT),
            std::cmp::Reverse(*rv),
        )
    });
    let Some((node, kubelet_port, _)) = candidates.first() else {
        return Backend {
            node: None,
            to_kubelet: false,
            use_tunnel: false,
        };
    };
    let reserved = *kubelet_port != 0 && (port == *kubelet_port || port == STREAM_SERVER_PORT);
    let egress = !node["metadata"]["labels"]["egress.k3s.io/cluster"].is_null();
    Backend {
        node: Some(super::field(node, "metadata.name")),
        to_kubelet: reserved,
        use_tunnel: reserved || egress,
    }
}

/// How this frontend reaches kubelets.
pub(super) struct Via {
    mode: Option<K3sRouting>,
    frontend: Arc<Frontend>,
    /// K3sRouting::Agent: the supervisor's choice for the location.
    backend: Option<Backend>,
}

/// The connection the API server's TLS to a kubelet runs over.
enum KubeletIo {
    Tcp(tokio::net::TcpStream),
    Tunnel(TunnelConn),
}

impl tokio::io::AsyncRead for KubeletIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            KubeletIo::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            KubeletIo::Tunnel(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for KubeletIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            KubeletIo::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            KubeletIo::Tunnel(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            KubeletIo::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            KubeletIo::Tunnel(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            KubeletIo::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            KubeletIo::Tunnel(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A TCP connection as Go's dialer reports failing to make one.
async fn dial_tcp(host: &str, address: &str) -> Result<tokio::net::TcpStream, String> {
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(address).await {
        Ok(addrs) => addrs.collect(),
        Err(_) => vec![],
    };
    let Some(addr) = addrs.first() else {
        return Err(format!("dial tcp: lookup {host}: no such host"));
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            _ => e.to_string(),
        };
        format!("dial tcp {address}: connect: {why}")
    })?;
    // Go's net package sets TCP_NODELAY on every connection.
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The connection to the kubelet, before TLS, as the API server's dialer makes it.
///
/// - Plain fake: a TCP connection.
/// - `K3sRouting::V121` (k3s v1.21's `setupProxyDialer`): if a tunnel session's client
///   key is the host, `tunnelServer.Dial(host, "tcp", "127.0.0.1:PORT")`; else a TCP
///   connection to the address.
/// - `K3sRouting::Agent`: the egress selector's HTTP CONNECT to the supervisor
///   (k8s.io/apiserver/pkg/server/egressselector), which runs `dialBackend`: through
///   the node's session to `127.0.0.1:PORT` for a kubelet, refused when the node has no
///   session; otherwise (or when a tunnel dial fails for another reason) a direct dial.
///   Any failure there comes back to the API server only as the CONNECT's status: the
///   supervisor answers 502 (`util.SendError(err, ..., http.StatusBadGateway)`, the
///   error text in a body nobody reads) and `tunnelHTTPConnect` fails with "proxy error
///   from HOST:PORT while dialing ADDRESS, code 502: 502 Bad Gateway". The API server
///   then reports that as it reports any dial error (upgradeaware.go `dial`: "error
///   dialing backend: ..."; the log streamer: `Get "URL": ...`), a 500 Status with no
///   reason (`ErrorToAPIStatus`): kubectl never sees a 502 or "failed to find Session".
///   (Recorded from k3s users: `Get "https://172.30.100.106:10250/containerLogs/...":
///   proxy error from 172.30.100.201:6443 while dialing 172.30.100.106:10250, code 503:
///   503 Service Unavailable`, k3s-io/k3s#7266.)
async fn connect(location: &Location, via: &Via) -> Result<KubeletIo, String> {
    let address = location.authority();
    let loopback = format!("127.0.0.1:{}", location.port);
    match via.mode {
        None => Ok(KubeletIo::Tcp(dial_tcp(&location.host, &address).await?)),
        Some(K3sRouting::V121) => {
            if via.frontend.tunnel.first(&location.host).is_some() {
                let conn = via
                    .frontend
                    .tunnel
                    .dial(&location.host, "tcp", &loopback)
                    .await?;
                Ok(KubeletIo::Tunnel(conn))
            } else {
                Ok(KubeletIo::Tcp(dial_tcp(&location.host, &address).await?))
            }
        }
        Some(K3sRouting::Agent) => {
            let proxy_error = || {
                format!(
                    "proxy error from {} while dialing {address}, code 502: 502 Bad Gateway",
                    via.frontend.addr
                )
            };
            let backend = via.backend.clone().unwrap_or(Backend {
                node: None,
                to_kubelet: false,
                use_tunnel: false,
            });
            // The fake's control plane runs no kubelet of its own (no ServerNodeName).
            let target = if backend.to_kubelet {
                loopback
            } else {
                address.clone()
            };
            if let (true, Some(node)) = (backend.use_tunnel, &backend.node) {
                match via.frontend.tunnel.dial(node, "tcp", &target).await {
                    Ok(conn) => return Ok(KubeletIo::Tunnel(conn)),
                    Err(e)
                        if backend.to_kubelet
                            && e.starts_with("failed to find Session for client") =>
                    {
                        return Err(proxy_error());
                    }
                    // Any other error: dial directly.
                    Err(_) => {}
                }
            }
            let host = target
                .rsplit_once(':')
                .map_or(target.as_str(), |(h, _)| h)
                .to_string();
            match dial_tcp(&host, &target).await {
                Ok(tcp) => Ok(KubeletIo::Tcp(tcp)),
                Err(_) => Err(proxy_error()),
            }
        }
    }
}

/// Go's error text for a failed dial or TLS handshake.
async fn dial(
    tls: Arc<rustls::ClientConfig>,
    location: &Location,
    via: &Via,
) -> Result<tokio_rustls::client::TlsStream<KubeletIo>, String> {
    let io = connect(location, via).await?;
    let name = rustls::pki_types::ServerName::try_from(location.host.clone())
        .map_err(|e| format!("invalid server name {}: {e}", location.host))?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, io)
        .await
        .map_err(|e| {
            let tls_error = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            match tls_error {
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => {
                    "tls: failed to verify certificate: x509: certificate signed by unknown authority".to_string()
                }
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                | Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => format!(
                    "tls: failed to verify certificate: x509: certificate is not valid for {}",
                    location.host
                ),
                Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired))
                | Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ExpiredContext { .. },
                )) => "tls: failed to verify certificate: x509: certificate has expired or is not yet valid".to_string(),
                Some(other) => format!("tls: {other}"),
                // The connection ended under the handshake. Behind the CONNECT proxy the
                // API server only sees it close; through a v1.21 tunnel it reads the
                // agent's Error text.
                None => match via.mode {
                    None => e.to_string(),
                    Some(_) if e.kind() == std::io::ErrorKind::UnexpectedEof => "EOF".to_string(),
                    Some(K3sRouting::Agent) => "EOF".to_string(),
                    Some(K3sRouting::V121) => e.to_string(),
                },
            }
        })
}

/// One HTTP/1.1 exchange with the kubelet; the connection task keeps running for an
/// upgrade.
async fn send(
    tls: Arc<rustls::ClientConfig>,
    location: &Location,
    via: &Via,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, String> {
    let stream = dial(tls, location, via).await?;
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        // Go writes canonical header names (Sec-Websocket-Key); so does this.
        .title_case_headers(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// Go's `http.CanonicalHeaderKey`.
fn canonical(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// The response body copied from the kubelet as it comes (decompressed if the kubelet
/// gzipped it, as Go's transport does for the Accept-Encoding it added itself).
fn stream_reply(code: StatusCode, headers: HeaderMap, body: Incoming, gunzip: bool) -> Reply {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        use std::io::Write as _;
        let mut body = body;
        let mut decoder = gunzip.then(|| flate2::write::GzDecoder::new(Vec::new()));
        while let Some(frame) = body.frame().await {
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            };
            let out = match decoder.as_mut() {
                Some(decoder) => {
                    if decoder
                        .write_all(&data)
                        .and_then(|_| decoder.flush())
                        .is_err()
                    {
                        return;
                    }
                    std::mem::take(decoder.get_mut())
                }
                None => data.to_vec(),
            };
            if !out.is_empty() && tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
        if let Some(rest) = decoder.and_then(|d| d.finish().ok()) {
            if !rest.is_empty() {
                let _ = tx.send(Ok(rest)).await;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut reply = warp::reply::stream(stream).into_response();
    *reply.status_mut() = code;
    for (name, value) in headers.iter() {
        reply.headers_mut().append(name, value.clone());
    }
    reply
}

/// `GenericHttpResponseChecker`: a kubelet's non-2xx answer to a logs request, as the
/// API server turns it into a Status.
async fn kubelet_error(code: u16, body: Incoming, name: &str) -> ApiError {
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(32 * 1024)]).into_owned();
    match code {
        500 => status(
            500,
            "InternalError",
            format!("Internal error occurred: {text}"),
            None,
        ),
        400 => bad_request(text),
        _ => {
            let (reason, message) = match code {
                404 => (
                    "NotFound",
                    "the server could not find the requested resource".to_string(),
                ),
                401 => (
                    "Unauthorized",
                    "the server has asked for the client to provide credentials".to_string(),
                ),
                403 => ("Forbidden", text.clone()),
                405 => (
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource"
                        .to_string(),
                ),
                503 => (
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request".to_string(),
                ),
                c if c >= 500 => (
                    "InternalError",
                    format!(
                        "an error on the server ({text:?}) has prevented the request from succeeding"
                    ),
                ),
                _ => (
                    "",
                    format!(
                        "the server responded with the status code {code} but did not return more information"
                    ),
                ),
            };
            let mut error = status(code, reason, format!("{message} ( pods/log {name})"), None);
            error.body["details"] = json!({"name": name, "kind": "pods/log"});
            error
        }
    }
}

pub(super) async fn handle(
    store: Arc<Mutex<Store>>,
    tls: Arc<rustls::ClientConfig>,
    frontend: Arc<Frontend>,
    request: hyper::Request<Incoming>,
    peer: SocketAddr,
    (namespace, name, sub): (String, String, String),
) -> Reply {
    match proxy(store, tls, frontend, request, peer, &namespace, &name, &sub).await {
        Ok(reply) => reply,
        Err(error) => error.reply(),
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
        && headers.contains_key(hyper::header::UPGRADE)
}

#[allow(clippy::too_many_arguments)]
async fn proxy(
    store: Arc<Mutex<Store>>,
    tls: Arc<rustls::ClientConfig>,
    frontend: Arc<Frontend>,
    mut request: hyper::Request<Incoming>,
    peer: SocketAddr,
    namespace: &str,
    name: &str,
    sub: &str,
) -> Result<Reply, ApiError> {
    let params: Vec<(String, String)> = url_pairs(request.uri().query().unwrap_or("")).collect();
    let mode = frontend.mode;
    let (location, backend) = {
        let mut store = store.lock().expect("store");
        let target = Target {
            resource: Resource::find("", "v1", "pods").expect("pods"),
            namespace: namespace.to_string(),
            name: Some(name.to_string()),
            subresource: Some(sub.to_string()),
        };
        let user_agent = request
            .headers()
            .get(hyper::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let record = RequestRecord::new(request.method(), &target, &BTreeMap::new(), user_agent);
        store.requests.push(record);
        let location = locate(&store, namespace, name, sub, &params, mode)?;
        let backend = match (&location, mode) {
            (Some(location), Some(K3sRouting::Agent)) => {
                Some(backend(&store, &location.host, location.port))
            }
            _ => None,
        };
        (location, backend)
    };
    let via = Via {
        mode,
        frontend,
        backend,
    };
    if sub == "log" {
        if request.method() != Method::GET {
            return Err(status(
                405,
                "MethodNotAllowed",
                format!("{} is not supported on pods/log", request.method()),
                None,
            ));
        }
        let Some(location) = location else {
            // An unbound pod's logs: an empty stream.
            let mut reply = warp::reply::Response::new(String::new().into());
            reply.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            return Ok(reply);
        };
        return logs(tls, &location, &via, name).await;
    }
    let location = location.expect("a location for exec, attach and portforward");
    if !is_upgrade(request.headers()) {
        return Err(bad_request("Upgrade request required".into()));
    }
    let client_upgrade = hyper::upgrade::on(&mut request);
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // The request as Go's Request.Write puts it: Host, User-Agent, Content-Length, then
    // the client's headers sorted by name; credentials dropped (the authentication
    // filter removes Authorization), X-Forwarded-For appended.
    let mut headers = HeaderMap::new();
    let header = |text: &str| HeaderValue::from_str(text).expect("header value");
    headers.insert(hyper::header::HOST, header(&location.authority()));
    let user_agent = parts
        .headers
        .get(hyper::header::USER_AGENT)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("Go-http-client/1.1"));
    headers.insert(hyper::header::USER_AGENT, user_agent);
    if !body.is_empty() || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
        headers.insert(
            hyper::header::CONTENT_LENGTH,
            header(&body.len().to_string()),
        );
    }
    let mut forwarded: Vec<String> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    forwarded.push(peer.ip().to_string());
    let mut rest: Vec<(String, HeaderName, HeaderValue)> = parts
        .headers
        .iter()
        .filter(|(n, _)| {
            let n = n.as_str();
            !matches!(
                n,
                "host" | "user-agent" | "content-length" | "authorization" | "x-forwarded-for"
            ) && !n.starts_with("impersonate-")
        })
        .map(|(n, v)| (canonical(n.as_str()), n.clone(), v.clone()))
        .collect();
    rest.push((
        "X-Forwarded-For".into(),
        HeaderName::from_static("x-forwarded-for"),
        header(&forwarded.join(", ")),
    ));
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, name, value) in rest {
        headers.append(name, value);
    }
    let mut outgoing = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(&location.path_and_query)
        .body(Full::new(body))
        .expect("request");
    *outgoing.headers_mut() = headers;
    let mut response = send(tls, &location, &via, outgoing)
        .await
        .map_err(|e| internal(format!("error dialing backend: {e}")))?;
    let code = response.status();
    if code != StatusCode::SWITCHING_PROTOCOLS {
        // The kubelet did not upgrade: its answer goes back as it is.
        let mut headers = response.headers().clone();
        for hop in ["content-length", "transfer-encoding", "connection"] {
            headers.remove(hop);
        }
        return Ok(stream_reply(code, headers, response.into_body(), false));
    }
    let kubelet_upgrade = hyper::upgrade::on(&mut response);
    let mut reply = warp::reply::Response::new(String::new().into());
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *reply.headers_mut() = response.headers().clone();
    tokio::spawn(async move {
        let (Ok(client), Ok(kubelet)) = (client_upgrade.await, kubelet_upgrade.await) else {
            return;
        };
        let (mut client_read, mut client_write) = tokio::io::split(TokioIo::new(client));
        let (mut kubelet_read, mut kubelet_write) = tokio::io::split(TokioIo::new(kubelet));
        // As the upgrade-aware handler: when either direction ends, both close.
        tokio::select! {
            _ = tokio::io::copy(&mut client_read, &mut kubelet_write) => {}
            _ = tokio::io::copy(&mut kubelet_read, &mut client_write) => {}
        }
    });
    Ok(reply)
}

/// The LocationStreamer's GET, as recorded: Host, `User-Agent: Go-http-client/1.1`,
/// `Accept-Encoding: gzip`, nothing of the client's.
async fn logs(
    tls: Arc<rustls::ClientConfig>,
    location: &Location,
    via: &Via,
    name: &str,
) -> Result<Reply, ApiError> {
    let mut request = hyper::Request::builder()
        .method(Method::GET)
        .uri(&location.path_and_query)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let headers = request.headers_mut();
    headers.insert(
        hyper::header::HOST,
        HeaderValue::from_str(&location.authority()).expect("host"),
    );
    headers.insert(
        hyper::header::USER_AGENT,
        HeaderValue::from_static("Go-http-client/1.1"),
    );
    headers.insert(
        hyper::header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip"),
    );
    let url = format!(
        "https://{}{}",
        location.authority(),
        location.path_and_query
    );
    let response = send(tls, location, via, request)
        .await
        .map_err(|e| internal(format!("Get \"{url}\": {e}")))?;
    let code = response.status();
    if !(200..=206).contains(&code.as_u16()) {
        return Err(kubelet_error(code.as_u16(), response.into_body(), name).await);
    }
    let gunzip = response
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    let mut headers = HeaderMap::new();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    Ok(stream_reply(code, headers, response.into_body(), gunzip))
}
