//! Pod subresources the API server serves by talking to the pod's kubelet
//! (pkg/registry/core/pod/rest/subresources.go and log.go, locations from
//! pkg/registry/core/pod/strategy.go, the node's address from
//! pkg/kubelet/client/kubelet_client.go): `log` through a plain GET (LocationStreamer),
//! `exec`, `attach` and `portforward` through the upgrade-aware proxy, which passes the
//! client's upgrade request (SPDY/3.1 or WebSocket) to the kubelet and, once the kubelet
//! answers 101, copies bytes both ways until either side closes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::Reply as _;

use super::{
    not_found, status, url_pairs, ApiError, Reply, RequestRecord, Resource, Store, Target,
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
fn node_location(store: &Store, node_name: &str) -> Result<(String, u16), ApiError> {
    let nodes = Resource::find("", "v1", "nodes").expect("nodes");
    let Some(node) = store.objects.get(&Store::key(&nodes, "", node_name)) else {
        return Err(not_found(&nodes, node_name));
    };
    let addresses = node["status"]["addresses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // The fake prefers InternalIP. A real API server's default
    // --kubelet-preferred-address-types is Hostname, InternalDNS, InternalIP,
    // ExternalDNS, ExternalIP: Hostname first (see shared/fixtures/README.md: a Hostname
    // that does not resolve breaks every logs/exec request there).
    let order = [
        "InternalIP",
        "Hostname",
        "InternalDNS",
        "ExternalDNS",
        "ExternalIP",
    ];
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
    let (host, port) = node_location(store, &node_name)?;
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

/// Go's error text for a failed dial or TLS handshake.
async fn dial(
    tls: Arc<rustls::ClientConfig>,
    location: &Location,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let address = location.authority();
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(&address).await {
        Ok(addrs) => addrs.collect(),
        Err(_) => vec![],
    };
    let Some(addr) = addrs.first() else {
        return Err(format!("dial tcp: lookup {}: no such host", location.host));
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            _ => e.to_string(),
        };
        format!("dial tcp {address}: connect: {why}")
    })?;
    let name = rustls::pki_types::ServerName::try_from(location.host.clone())
        .map_err(|e| format!("invalid server name {}: {e}", location.host))?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
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
                None => e.to_string(),
            }
        })
}

/// One HTTP/1.1 exchange with the kubelet; the connection task keeps running for an
/// upgrade.
async fn send(
    tls: Arc<rustls::ClientConfig>,
    location: &Location,
    request: hyper::Request<Full<Bytes>>,
) -> Result<hyper::Response<Incoming>, String> {
    let stream = dial(tls, location).await?;
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
    request: hyper::Request<Incoming>,
    peer: SocketAddr,
    (namespace, name, sub): (String, String, String),
) -> Reply {
    match proxy(store, tls, request, peer, &namespace, &name, &sub).await {
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

async fn proxy(
    store: Arc<Mutex<Store>>,
    tls: Arc<rustls::ClientConfig>,
    mut request: hyper::Request<Incoming>,
    peer: SocketAddr,
    namespace: &str,
    name: &str,
    sub: &str,
) -> Result<Reply, ApiError> {
    let params: Vec<(String, String)> = url_pairs(request.uri().query().unwrap_or("")).collect();
    let location = {
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
        locate(&store, namespace, name, sub, &params)?
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
        return logs(tls, &location, name).await;
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
    let mut response = send(tls, &location, outgoing)
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
    let response = send(tls, location, request)
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
