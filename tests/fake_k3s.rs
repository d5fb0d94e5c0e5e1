//! The fake API server in k3s mode: HTTPS, the agent tunnel (a remotedialer server
//! session at /v1-k3s/connect), kubelet requests routed through tunnel sessions, and the
//! kubelet client CSR approver and signer. The tunnel client here is a tiny one written
//! for these tests from remotedialer's wire format (message.go), not the project's.

mod fake_apiserver;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_apiserver::pki::base64_encode;
use fake_apiserver::{kubectl, FakeApiServer, K3sRouting, TunnelMessage};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const DATA: i64 = 1;
const CONNECT: i64 = 2;
const ERROR: i64 = 3;
const PAUSE: i64 = 6;
const RESUME: i64 = 7;
const SYNC: i64 = 8;

// ---- remotedialer frames, written here from message.go ----

fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut ux = (value as u64) << 1;
    if value < 0 {
        ux = !ux;
    }
    while ux >= 0x80 {
        out.push(ux as u8 | 0x80);
        ux >>= 7;
    }
    out.push(ux as u8);
}

fn get_varint(bytes: &[u8], pos: &mut usize) -> i64 {
    let (mut x, mut shift) = (0u64, 0);
    loop {
        let b = bytes[*pos];
        *pos += 1;
        x |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            break;
        }
        shift += 7;
    }
    let value = (x >> 1) as i64;
    if x & 1 != 0 {
        !value
    } else {
        value
    }
}

static NEXT_ID: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1000);

/// A frame as remotedialer's `message.Bytes` writes it.
fn frame(conn_id: i64, kind: i64, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    put_varint(
        &mut out,
        NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    );
    put_varint(&mut out, conn_id);
    put_varint(&mut out, kind);
    if kind == DATA || kind == CONNECT {
        put_varint(&mut out, 15_000);
    }
    out.extend_from_slice(payload);
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Frame {
    conn_id: i64,
    kind: i64,
    payload: Vec<u8>,
}

fn parse(bytes: &[u8]) -> Frame {
    let mut pos = 0;
    let _id = get_varint(bytes, &mut pos);
    let conn_id = get_varint(bytes, &mut pos);
    let kind = get_varint(bytes, &mut pos);
    if kind == DATA || kind == CONNECT {
        assert_eq!(get_varint(bytes, &mut pos), 15_000, "the legacy deadline");
    }
    Frame {
        conn_id,
        kind,
        payload: bytes[pos..].to_vec(),
    }
}

// ---- TLS and the WebSocket ----

/// The DER of the first PEM block (certificate or key).
fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::{PemObject, SectionKind};
    <(SectionKind, Vec<u8>)>::from_pem_slice(pem.as_bytes())
        .expect("PEM")
        .1
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;
type Ws = tokio_tungstenite::WebSocketStream<Tls>;

/// A TLS connection to the fake, trusting its cluster CA, with a client certificate.
async fn tls(addr: SocketAddr, ca: &str, identity: Option<&(String, String)>) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(pem_der(ca)))
        .expect("ca");
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(pem_der(cert))],
                rustls::pki_types::PrivateKeyDer::try_from(pem_der(key)).expect("key"),
            )
            .expect("client auth"),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name"),
            tcp,
        )
        .await
        .expect("tls")
}

/// An agent's tunnel WebSocket to a frontend.
async fn agent(addr: SocketAddr, ca: &str, identity: &(String, String)) -> Ws {
    let stream = tls(addr, ca, Some(identity)).await;
    let (ws, response) = tokio_tungstenite::client_async(
        format!("wss://127.0.0.1:{}/v1-k3s/connect", addr.port()),
        stream,
    )
    .await
    .expect("websocket");
    assert_eq!(response.status(), 101);
    ws
}

async fn wait_sessions(server: &FakeApiServer, node: &str, want: usize) {
    for _ in 0..200 {
        if server.tunnel_sessions(node) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{node}: {} sessions, want {want}",
        server.tunnel_sessions(node)
    );
}

/// The next binary frame from the server (pongs skipped).
async fn next_frame(ws: &mut Ws) -> Frame {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("open")
            .expect("a message");
        match message {
            Message::Binary(bytes) => return parse(&bytes),
            Message::Pong(_) | Message::Ping(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// No binary frame within `ms`.
async fn no_frame(ws: &mut Ws, ms: u64) {
    if let Ok(Some(Ok(Message::Binary(bytes)))) =
        tokio::time::timeout(Duration::from_millis(ms), ws.next()).await
    {
        panic!("unexpected frame {:?}", parse(&bytes));
    }
}

/// Waits until the server has handled everything sent before: Data for a connection it
/// does not have, answered in order with an Error.
async fn round_trip(ws: &mut Ws) {
    ws.send(Message::Binary(frame(1_000_000, DATA, b"?").into()))
        .await
        .expect("send");
    loop {
        let f = next_frame(ws).await;
        if f.conn_id == 1_000_000 && f.kind == ERROR {
            return;
        }
    }
}

/// One HTTP request on its own connection: (status, headers, body).
async fn http(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&(String, String)>,
    request: warp::http::Request<String>,
) -> (u16, warp::http::HeaderMap, String) {
    let stream = tls(addr, ca, identity).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn connect_request(addr: SocketAddr, upgrade: bool) -> warp::http::Request<String> {
    let mut builder = warp::http::Request::get("/v1-k3s/connect").header("host", addr.to_string());
    if upgrade {
        builder = builder
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    }
    builder.body(String::new()).expect("request")
}

// ---- clients of the API ----

async fn admin(server: &FakeApiServer) -> kube::Client {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = server.write_kubeconfig(dir.path());
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

/// A kube-rs client authenticating with a client certificate only.
async fn cert_client(server: &FakeApiServer, identity: &(String, String)) -> kube::Client {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\", certificate-authority-data: \"{}\"}}\nusers:\n- name: cert\n  user: {{client-certificate-data: \"{}\", client-key-data: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: cert}}\ncurrent-context: fake\n",
        server.url(),
        base64_encode(server.cluster_ca_pem().as_bytes()),
        base64_encode(identity.0.as_bytes()),
        base64_encode(identity.1.as_bytes()),
    );
    std::fs::write(&path, text).expect("kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

async fn run_kubectl(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let kubeconfig = kubeconfig.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&kubeconfig, &args, None)
    })
    .await
    .expect("task")
}

async fn create(client: &kube::Client, path: &str, body: Value) -> Value {
    let request = warp::http::Request::post(path)
        .header("content-type", "application/json")
        .body(body.to_string().into_bytes())
        .expect("request");
    let text = client.request_text(request).await.expect("create");
    serde_json::from_str(&text).expect("json")
}

async fn get_status(client: &kube::Client, path: &str) -> kube::core::Status {
    let request = warp::http::Request::get(path)
        .body(vec![])
        .expect("request");
    match client.request_text(request).await {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A PEM CSR made with rcgen, and its key.
fn make_csr(cn: &str, orgs: &[&str], ips: &[&str], dns: &[&str]) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    for o in orgs {
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, *o);
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    for ip in ips {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(ip.parse().expect("ip")));
    }
    for d in dns {
        params.subject_alt_names.push(rcgen::SanType::DnsName(
            (*d).to_string().try_into().expect("dns"),
        ));
    }
    let csr = params.serialize_request(&key).expect("csr");
    (csr.pem().expect("pem"), key)
}

fn csr_object(name: &str, pem: &str, signer: &str, usages: &[&str]) -> CertificateSigningRequest {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "request": k8s_openapi::ByteString(pem.as_bytes().to_vec()),
            "signerName": signer,
            "usages": usages,
        },
    }))
    .expect("csr")
}

async fn approve(api: &Api<CertificateSigningRequest>, name: &str) {
    let mut csr = api.get(name).await.expect("csr");
    csr.status.get_or_insert_with(Default::default).conditions = Some(vec![serde_json::from_value(
        json!({"type": "Approved", "status": "True", "reason": "Test", "message": "approved by the test"}),
    )
    .expect("condition")]);
    api.replace_subresource("approval", name, &PostParams::default(), &csr)
        .await
        .expect("approval");
}

/// A kubelet serving certificate for `names` (IP 127.0.0.1 and DNS names), through the
/// CSR API, signed by the cluster CA: (certificate PEM, key PEM).
async fn serving_cert(client: &kube::Client, node: &str, names: &[&str]) -> (String, String) {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let (pem, key) = make_csr(
        &format!("system:node:{node}"),
        &["system:nodes"],
        &["127.0.0.1"],
        names,
    );
    let name = format!("serving-{node}");
    api.create(
        &PostParams::default(),
        &csr_object(
            &name,
            &pem,
            "kubernetes.io/kubelet-serving",
            &["digital signature", "server auth"],
        ),
    )
    .await
    .expect("create csr");
    approve(&api, &name).await;
    let signed = api.get(&name).await.expect("csr");
    let cert = signed.status.and_then(|s| s.certificate).expect("signed");
    (String::from_utf8(cert.0).expect("pem"), key.serialize_pem())
}

/// A test kubelet: TLS with the given serving certificate; answers a SPDY upgrade with
/// 101 and then echoes, any other request with two log lines; records each request line
/// with the TLS server name it was asked for.
async fn kubelet(cert: &str, key: &str) -> (u16, Arc<Mutex<Vec<(String, String)>>>) {
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(pem_der(cert))],
            rustls::pki_types::PrivateKeyDer::try_from(pem_der(key)).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(vec![]));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let log = log.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().unwrap_or("").to_string();
                let mut head = vec![];
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tls.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let line = text.lines().next().unwrap_or_default().to_string();
                log.lock().expect("log").push((line, sni));
                if text
                    .to_ascii_lowercase()
                    .contains("\r\nupgrade: spdy/3.1\r\n")
                {
                    let _ = tls
                        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n")
                        .await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    return;
                }
                let body = "one\ntwo\n";
                let _ = tls
                    .write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, seen)
}

/// A tunnel agent that does what the remotedialer client does with a Connect: dials the
/// address and copies bytes both ways as Data, ending with Error "EOF" (or the dial
/// error). Returns the Connect payloads it got.
fn bridge(ws: Ws) -> Arc<Mutex<Vec<String>>> {
    let connects = Arc::new(Mutex::new(vec![]));
    let seen = connects.clone();
    let (mut sink, mut stream) = ws.split();
    let (out, mut queue) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    tokio::spawn(async move {
        while let Some(frame) = queue.recv().await {
            if sink.send(Message::Binary(frame.into())).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut conns: BTreeMap<i64, tokio::sync::mpsc::Sender<Vec<u8>>> = BTreeMap::new();
        while let Some(Ok(message)) = stream.next().await {
            let Message::Binary(bytes) = message else {
                continue;
            };
            let received = parse(&bytes);
            match received.kind {
                CONNECT => {
                    let payload = String::from_utf8_lossy(&received.payload).into_owned();
                    seen.lock().expect("seen").push(payload.clone());
                    let address = payload.split_once('/').map(|(_, a)| a.to_string());
                    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
                    conns.insert(received.conn_id, tx);
                    let out = out.clone();
                    let id = received.conn_id;
                    tokio::spawn(async move {
                        let address = address.unwrap_or_default();
                        let tcp = match TcpStream::connect(&address).await {
                            Ok(tcp) => tcp,
                            Err(_) => {
                                // As Go's dialer words it.
                                let text =
                                    format!("dial tcp {address}: connect: connection refused");
                                let _ = out.send(frame_error(id, &text)).await;
                                return;
                            }
                        };
                        let (mut read, mut write) = tcp.into_split();
                        let writer = tokio::spawn(async move {
                            while let Some(data) = rx.recv().await {
                                if write.write_all(&data).await.is_err() {
                                    return;
                                }
                            }
                        });
                        let mut buf = vec![0u8; 8192];
                        loop {
                            match read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if out.send(frame(id, DATA, &buf[..n])).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = out.send(frame_error(id, "EOF")).await;
                        writer.abort();
                    });
                }
                DATA => {
                    if let Some(tx) = conns.get(&received.conn_id) {
                        let _ = tx.send(received.payload).await;
                    }
                }
                ERROR => {
                    conns.remove(&received.conn_id);
                }
                _ => {}
            }
        }
    });
    connects
}

fn frame_error(conn_id: i64, text: &str) -> Vec<u8> {
    frame(conn_id, ERROR, text.as_bytes())
}

fn node(name: &str, addresses: &[(&str, &str)], port: u16) -> Value {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(ty, a)| json!({"type": ty, "address": a}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": addresses, "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}},
    })
}

fn pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
    })
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    listener.local_addr().expect("addr").port()
}

fn of_kind(log: &[TunnelMessage], kind: i64) -> Vec<TunnelMessage> {
    log.iter().filter(|m| m.kind == kind).cloned().collect()
}

// ---- the tests ----

#[tokio::test]
async fn k3s_mode_serves_https_to_kubectl_and_kube_rs_with_a_k3s_version_and_endpoints() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    assert_eq!(server.url(), format!("https://{}", server.addr));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let (ok, out) = run_kubectl(&kubeconfig, &["version", "-o", "json"]).await;
    assert!(ok, "{out}");
    let version: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.33.4+k3s1");
    assert_eq!(version["serverVersion"]["minor"], "33");
    let (ok, out) = run_kubectl(
        &kubeconfig,
        &[
            "get",
            "endpoints",
            "kubernetes",
            "-n",
            "default",
            "-o",
            "json",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let endpoints: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        endpoints["subsets"],
        json!([{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "https", "port": server.addr.port(), "protocol": "TCP"}]}])
    );
    // kube-rs trusts the CA from the kubeconfig too.
    let client = admin(&server).await;
    let info = client.apiserver_version().await.expect("version");
    assert_eq!(info.git_version, "v1.33.4+k3s1");
    let old = FakeApiServer::start_k3s(K3sRouting::V121).await;
    let info = admin(&old)
        .await
        .apiserver_version()
        .await
        .expect("version");
    assert_eq!(
        (
            info.major.as_str(),
            info.minor.as_str(),
            info.git_version.as_str()
        ),
        ("1", "21", "v1.21.2+k3s1")
    );
    // The plain fake is unchanged: HTTP, and no tunnel endpoint.
    let plain = FakeApiServer::start().await;
    assert!(plain.url().starts_with("http://"));
    let status = get_status(&admin(&plain).await, "/v1-k3s/connect").await;
    assert_eq!(status.code, 404);
}

#[tokio::test]
async fn the_tunnel_endpoint_authenticates_as_k3s_does() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let ca = server.cluster_ca_pem();
    let addr = server.addr;
    // No client certificate: the supervisor's HasRole(system:nodes) refuses.
    let (code, headers, body) = http(addr, &ca, None, connect_request(addr, true)).await;
    assert_eq!(code, 403, "{body}");
    let status: Value = serde_json::from_str(&body).expect("status");
    assert_eq!(status["message"], "forbidden");
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(headers["connection"], "close");
    // A user who is not in system:nodes: the same.
    let alice = server.client_cert("alice", &["dev"]);
    let (code, _, _) = http(addr, &ca, Some(&alice), connect_request(addr, true)).await;
    assert_eq!(code, 403);
    // In system:nodes but not named system:node:*: remotedialer's errFailedAuth.
    let impostor = server.client_cert("alice", &["system:nodes"]);
    let (code, _, body) = http(addr, &ca, Some(&impostor), connect_request(addr, true)).await;
    assert_eq!(code, 401, "{body}");
    let status: Value = serde_json::from_str(&body).expect("status");
    assert_eq!(status["message"], "failed authentication");
    assert_eq!(status["reason"], "Unauthorized");
    assert_eq!(server.tunnel_sessions("alice"), 0);
    // A node, without a WebSocket handshake: gorilla's upgrader refuses.
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let (code, _, body) = http(addr, &ca, Some(&n1), connect_request(addr, false)).await;
    assert_eq!(code, 400);
    assert!(
        body.contains("websocket: the client is not using the websocket protocol: 'upgrade' token not found in 'Connection' header"),
        "{body}"
    );
    // A node with a handshake: a session for client key n1.
    let _ws = agent(addr, &ca, &n1).await;
    wait_sessions(&server, "n1", 1).await;
    // k3s v1.21: the same checks, remotedialer's plain text error, an empty 403.
    let old = FakeApiServer::start_k3s(K3sRouting::V121).await;
    let ca = old.cluster_ca_pem();
    let (code, _, body) = http(old.addr, &ca, None, connect_request(old.addr, true)).await;
    assert_eq!((code, body.as_str()), (403, ""));
    let impostor = old.client_cert("alice", &["system:nodes"]);
    let (code, _, body) = http(
        old.addr,
        &ca,
        Some(&impostor),
        connect_request(old.addr, true),
    )
    .await;
    assert_eq!((code, body.as_str()), (401, "failed authentication"));
}

#[tokio::test]
async fn connect_data_and_error_round_trip_through_a_session() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let mut ws = agent(server.addr, &server.cluster_ca_pem(), &n1).await;
    wait_sessions(&server, "n1", 1).await;
    // The first dial of a session is connection 2 (nextConnID starts at 1).
    let mut conn = server.tunnel_dial("n1", "127.0.0.1:9").await.expect("dial");
    let connect = next_frame(&mut ws).await;
    assert_eq!(
        connect,
        Frame {
            conn_id: 2,
            kind: CONNECT,
            payload: b"tcp/127.0.0.1:9".to_vec()
        }
    );
    conn.write_all(b"hello").await.expect("write");
    assert_eq!(
        next_frame(&mut ws).await,
        Frame {
            conn_id: 2,
            kind: DATA,
            payload: b"hello".to_vec()
        }
    );
    ws.send(Message::Binary(frame(2, DATA, b"world").into()))
        .await
        .expect("send");
    let mut buf = [0u8; 5];
    conn.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"world");
    // The agent ends it with EOF: a clean end of stream, and the server's own Error back.
    ws.send(Message::Binary(frame_error(2, "EOF").into()))
        .await
        .expect("send");
    let mut rest = vec![];
    assert_eq!(conn.read_to_end(&mut rest).await.expect("eof"), 0);
    assert_eq!(
        next_frame(&mut ws).await,
        Frame {
            conn_id: 2,
            kind: ERROR,
            payload: b"EOF".to_vec()
        }
    );
    assert!(conn.write_all(b"late").await.is_err());
    drop(conn);
    no_frame(&mut ws, 200).await;
    // The server closes one: Error "EOF".
    let second = server
        .tunnel_dial("n1", "127.0.0.1:10250")
        .await
        .expect("dial");
    assert_eq!(next_frame(&mut ws).await.conn_id, 3);
    drop(second);
    assert_eq!(
        next_frame(&mut ws).await,
        Frame {
            conn_id: 3,
            kind: ERROR,
            payload: b"EOF".to_vec()
        }
    );
    // The agent could not dial: its error is what the reader gets.
    let mut third = server.tunnel_dial("n1", "127.0.0.1:1").await.expect("dial");
    assert_eq!(next_frame(&mut ws).await.conn_id, 4);
    ws.send(Message::Binary(
        frame_error(4, "dial tcp 127.0.0.1:1: connect: connection refused").into(),
    ))
    .await
    .expect("send");
    let err = third.read(&mut buf).await.expect_err("an error");
    assert_eq!(
        err.to_string(),
        "dial tcp 127.0.0.1:1: connect: connection refused"
    );
    // Data for a connection the server does not have.
    ws.send(Message::Binary(frame(99, DATA, b"?").into()))
        .await
        .expect("send");
    let answer = loop {
        let f = next_frame(&mut ws).await;
        if f.conn_id == 99 {
            break f;
        }
    };
    assert_eq!(answer.kind, ERROR);
    let text = String::from_utf8(answer.payload).expect("utf8");
    assert!(
        text.starts_with("connection not found n1/") && text.ends_with("/99"),
        "{text}"
    );
    // Everything the agent sent is in the log, decoded.
    let log = server.tunnel_log("n1");
    let data = of_kind(&log, DATA);
    assert_eq!(data[0].conn_id, 2);
    assert_eq!(data[0].payload, b"world");
    let errors: Vec<(i64, Vec<u8>)> = of_kind(&log, ERROR)
        .into_iter()
        .map(|m| (m.conn_id, m.payload))
        .collect();
    assert_eq!(errors[0], (2, b"EOF".to_vec()));
    // WebSocket pings are answered.
    ws.send(Message::Ping(b"p".to_vec().into()))
        .await
        .expect("ping");
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Ok(Message::Pong(_))) = ws.next().await {
                return;
            }
        }
    })
    .await;
    assert!(pong.is_ok(), "no pong");
}

#[tokio::test]
async fn sync_connections_closes_what_the_agent_does_not_list() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let mut ws = agent(server.addr, &server.cluster_ca_pem(), &n1).await;
    wait_sessions(&server, "n1", 1).await;
    let mut conns = vec![];
    for _ in 0..3 {
        conns.push(server.tunnel_dial("n1", "127.0.0.1:9").await.expect("dial"));
        next_frame(&mut ws).await;
    }
    let ids: Vec<i64> = conns.iter().map(|c| c.id()).collect();
    assert_eq!(ids, vec![2, 3, 4]);
    ws.send(Message::Binary(frame(0, SYNC, &3u64.to_le_bytes()).into()))
        .await
        .expect("sync");
    let mut buf = [0u8; 1];
    let err = conns[0].read(&mut buf).await.expect_err("closed");
    assert_eq!(err.to_string(), "sync from client");
    assert!(conns[2].read(&mut buf).await.is_err());
    assert!(conns[0].write_all(b"x").await.is_err());
    // Connection 3 lives on.
    conns[1].write_all(b"x").await.expect("write");
    assert_eq!(
        next_frame(&mut ws).await,
        Frame {
            conn_id: 3,
            kind: DATA,
            payload: b"x".to_vec()
        }
    );
    // No Error went out for the pruned ones, not even when they are dropped.
    let pruned = [conns.remove(2), conns.remove(0)];
    drop(pruned);
    no_frame(&mut ws, 200).await;
    // A payload that is not a list of u64s ends the session.
    ws.send(Message::Binary(frame(0, SYNC, &[1, 2, 3]).into()))
        .await
        .expect("sync");
    wait_sessions(&server, "n1", 0).await;
}

#[tokio::test]
async fn pause_and_resume_in_both_directions() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let mut ws = agent(server.addr, &server.cluster_ca_pem(), &n1).await;
    wait_sessions(&server, "n1", 1).await;
    let mut conn = server.tunnel_dial("n1", "127.0.0.1:9").await.expect("dial");
    next_frame(&mut ws).await;
    // The agent pauses the connection: the server's writer waits.
    ws.send(Message::Binary(frame(2, PAUSE, &[]).into()))
        .await
        .expect("pause");
    round_trip(&mut ws).await;
    let write = tokio::spawn(async move {
        conn.write_all(b"held").await.expect("write");
        conn
    });
    no_frame(&mut ws, 300).await;
    ws.send(Message::Binary(frame(2, RESUME, &[]).into()))
        .await
        .expect("resume");
    assert_eq!(next_frame(&mut ws).await.payload, b"held");
    let mut conn = write.await.expect("writer");
    // The agent sends more than MaxBuffer (2 MiB) unread: the server pauses it, and
    // resumes it once its reader has drained the buffer below MaxBuffer/8.
    let chunk = vec![7u8; 64 * 1024];
    for _ in 0..33 {
        ws.send(Message::Binary(frame(2, DATA, &chunk).into()))
            .await
            .expect("data");
    }
    assert_eq!(
        next_frame(&mut ws).await,
        Frame {
            conn_id: 2,
            kind: PAUSE,
            payload: vec![]
        }
    );
    let mut total = 0;
    let mut buf = vec![0u8; 256 * 1024];
    while total < 33 * chunk.len() {
        total += conn.read(&mut buf).await.expect("read");
    }
    assert_eq!(
        next_frame(&mut ws).await,
        Frame {
            conn_id: 2,
            kind: RESUME,
            payload: vec![]
        }
    );
    let log = server.tunnel_log("n1");
    assert_eq!(of_kind(&log, PAUSE).len(), 1);
    assert_eq!(of_kind(&log, RESUME).len(), 1);
}

#[tokio::test]
async fn unknown_types_are_ignored_and_undecodable_frames_end_the_session() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let ca = server.cluster_ca_pem();
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let mut ws = agent(server.addr, &ca, &n1).await;
    wait_sessions(&server, "n1", 1).await;
    // Type 42, AddClient and RemoveClient (no peers here), Pause of nothing: ignored.
    for f in [
        frame(5, 42, b"whatever"),
        frame(0, 4, b"peer/17"),
        frame(0, 5, b"peer/17"),
        frame(77, PAUSE, &[]),
    ] {
        ws.send(Message::Binary(f.into())).await.expect("send");
    }
    round_trip(&mut ws).await;
    let _conn = server.tunnel_dial("n1", "127.0.0.1:9").await.expect("dial");
    assert_eq!(next_frame(&mut ws).await.kind, CONNECT);
    assert_eq!(server.tunnel_sessions("n1"), 1);
    let log = server.tunnel_log("n1");
    assert!(log.iter().any(|m| m.kind == 42 && m.payload == b"whatever"));
    // A raw frame from the server arrives as it is.
    server
        .tunnel_send_raw("n1", vec![1, 2, 3])
        .await
        .expect("raw");
    let raw = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("frame")
        .expect("open")
        .expect("message");
    assert_eq!(raw, Message::Binary(vec![1, 2, 3].into()));
    // A truncated header ends the session (newServerMessage fails), and is logged.
    ws.send(Message::Binary(vec![0x80].into()))
        .await
        .expect("send");
    wait_sessions(&server, "n1", 0).await;
    let last = server.tunnel_log("n1").pop().expect("logged");
    assert_eq!(last.error.as_deref(), Some("unexpected EOF"));
    // A text message ends it (errWrongMessageType), so does a Connect from the agent.
    let mut ws = agent(server.addr, &ca, &n1).await;
    wait_sessions(&server, "n1", 1).await;
    ws.send(Message::Text("hello".into())).await.expect("text");
    wait_sessions(&server, "n1", 0).await;
    let mut ws = agent(server.addr, &ca, &n1).await;
    wait_sessions(&server, "n1", 1).await;
    ws.send(Message::Binary(
        frame(1, CONNECT, b"tcp/127.0.0.1:22").into(),
    ))
    .await
    .expect("connect");
    wait_sessions(&server, "n1", 0).await;
    // An AddClient whose address is not "key/number": a server session (which keeps
    // remote client keys) fails to parse it and ends.
    let mut ws = agent(server.addr, &ca, &n1).await;
    wait_sessions(&server, "n1", 1).await;
    ws.send(Message::Binary(frame(0, 4, b"peer/x").into()))
        .await
        .expect("add client");
    wait_sessions(&server, "n1", 0).await;
}

#[tokio::test]
async fn several_sessions_per_node_and_a_crash_drops_them_without_a_close_frame() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let ca = server.cluster_ca_pem();
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let mut first = agent(server.addr, &ca, &n1).await;
    let mut second = agent(server.addr, &ca, &n1).await;
    wait_sessions(&server, "n1", 2).await;
    // Dials use the first session.
    let conn = server.tunnel_dial("n1", "127.0.0.1:9").await.expect("dial");
    assert_eq!(next_frame(&mut first).await.kind, CONNECT);
    no_frame(&mut second, 200).await;
    server.drop_tunnel_sessions();
    for ws in [&mut first, &mut second] {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(frame))) => return Some(frame),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
        .expect("the connection ends");
        assert_eq!(end, None, "no close frame");
    }
    wait_sessions(&server, "n1", 0).await;
    let mut conn = conn;
    let mut buf = [0u8; 1];
    let err = conn.read(&mut buf).await.expect_err("closed");
    assert_eq!(err.to_string(), "tunnel disconnect");
}

#[tokio::test]
async fn agent_mode_routes_kubelet_requests_through_the_nodes_session() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let client = admin(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let (cert, key) = serving_cert(&client, "n1", &["n1"]).await;
    let (port, seen) = kubelet(&cert, &key).await;
    create(
        &client,
        "/api/v1/nodes",
        node("n1", &[("InternalIP", "127.0.0.1")], port),
    )
    .await;
    create(&client, "/api/v1/namespaces/default/pods", pod("web", "n1")).await;
    // No session for n1: the supervisor refuses the CONNECT (502), which the API server
    // reports as a dial error, a 500.
    let (ok, out) = run_kubectl(&kubeconfig, &["logs", "web"]).await;
    let proxy_error = format!(
        "proxy error from {} while dialing 127.0.0.1:{port}, code 502: 502 Bad Gateway",
        server.addr
    );
    assert!(!ok && out.contains(&proxy_error), "{out}");
    let status = get_status(&client, "/api/v1/namespaces/default/pods/web/log").await;
    assert_eq!(status.code, 500);
    assert_eq!(
        status.message,
        format!("Get \"https://127.0.0.1:{port}/containerLogs/default/web/main\": {proxy_error}")
    );
    assert!(seen.lock().expect("seen").is_empty(), "not dialed directly");
    // An exec upgrade fails the same way, as "error dialing backend".
    let request = warp::http::Request::post(
        "/api/v1/namespaces/default/pods/web/exec?command=ls&stdout=true",
    )
    .header("connection", "Upgrade")
    .header("upgrade", "SPDY/3.1")
    .body(vec![])
    .expect("request");
    match client.request_text(request).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 500);
            assert_eq!(
                status.message,
                format!("error dialing backend: {proxy_error}")
            );
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    // With n1's session: through the tunnel to the node's loopback, TLS inside.
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let connects = bridge(agent(server.addr, &server.cluster_ca_pem(), &n1).await);
    wait_sessions(&server, "n1", 1).await;
    let (ok, out) = run_kubectl(&kubeconfig, &["logs", "web"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, "one\ntwo\n");
    assert_eq!(
        connects.lock().expect("connects").clone(),
        vec![format!("tcp/127.0.0.1:{port}")]
    );
    // TLS inside the tunnel, to the address the API server chose (no SNI for an IP).
    let requests = seen.lock().expect("seen").clone();
    assert_eq!(
        requests,
        vec![(
            "GET /containerLogs/default/web/main HTTP/1.1".to_string(),
            String::new()
        )]
    );
    // An upgrade through the tunnel: the kubelet's 101, then bytes both ways.
    let mut raw = tls(server.addr, &server.cluster_ca_pem(), None).await;
    raw.write_all(b"POST /api/v1/namespaces/default/pods/web/exec?command=cat&stdin=true&stdout=true HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer fake-token\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\nContent-Length: 0\r\n\r\n")
        .await
        .expect("write");
    let mut head = vec![];
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        raw.read_exact(&mut byte).await.expect("head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    raw.write_all(b"through the tunnel").await.expect("write");
    let mut echo = [0u8; 18];
    raw.read_exact(&mut echo).await.expect("echo");
    assert_eq!(&echo, b"through the tunnel");
    drop(raw);
    assert_eq!(connects.lock().expect("connects").len(), 2);
    // A node by name goes through its session too: a node whose only address is its
    // name (a Hostname) still reaches the kubelet.
    create(
        &client,
        "/api/v1/nodes",
        node("n1-by-name", &[("Hostname", "n1")], port),
    )
    .await;
    create(
        &client,
        "/api/v1/namespaces/default/pods",
        pod("named", "n1-by-name"),
    )
    .await;
    let (ok, out) = run_kubectl(&kubeconfig, &["logs", "named"]).await;
    assert!(ok, "{out}");
    assert_eq!(connects.lock().expect("connects").len(), 3);
    // The agent cannot reach its kubelet: it answers the Connect with an Error, and the
    // API server, behind the CONNECT proxy, only sees the connection end.
    let refused = closed_port().await;
    create(
        &client,
        "/api/v1/nodes",
        node("n9", &[("InternalIP", "127.0.0.1")], refused),
    )
    .await;
    create(
        &client,
        "/api/v1/namespaces/default/pods",
        pod("down", "n9"),
    )
    .await;
    let n9 = server.client_cert("system:node:n9", &["system:nodes"]);
    let n9_connects = bridge(agent(server.addr, &server.cluster_ca_pem(), &n9).await);
    wait_sessions(&server, "n9", 1).await;
    let status = get_status(&client, "/api/v1/namespaces/default/pods/down/log").await;
    assert_eq!(status.code, 500);
    assert_eq!(
        status.message,
        format!("Get \"https://127.0.0.1:{refused}/containerLogs/default/down/main\": EOF")
    );
    assert_eq!(
        n9_connects.lock().expect("connects").clone(),
        vec![format!("tcp/127.0.0.1:{refused}")]
    );
    // An address no node has is dialed directly (and fails as a CONNECT error).
    let gone = closed_port().await;
    create(
        &client,
        "/api/v1/nodes",
        node("elsewhere", &[("InternalIP", "127.0.0.2")], gone),
    )
    .await;
    create(
        &client,
        "/api/v1/namespaces/default/pods",
        pod("far", "elsewhere"),
    )
    .await;
    let status = get_status(&client, "/api/v1/namespaces/default/pods/far/log").await;
    assert!(
        status.message.ends_with(&format!(
            "proxy error from {} while dialing 127.0.0.2:{gone}, code 502: 502 Bad Gateway",
            server.addr
        )),
        "{}",
        status.message
    );
    assert_eq!(connects.lock().expect("connects").len(), 3);
}

#[tokio::test]
async fn v121_routes_by_hostname_through_a_session_named_after_the_host() {
    let server = FakeApiServer::start_k3s(K3sRouting::V121).await;
    let client = admin(&server).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let name = "fake-k3s-agent-n1";
    let (cert, key) = serving_cert(&client, name, &[name]).await;
    let (port, seen) = kubelet(&cert, &key).await;
    create(
        &client,
        "/api/v1/nodes",
        node(
            name,
            &[("Hostname", name), ("InternalIP", "127.0.0.1")],
            port,
        ),
    )
    .await;
    create(&client, "/api/v1/namespaces/default/pods", pod("web", name)).await;
    // Hostname first and no session: a direct dial of a name that does not resolve, as
    // recorded from k3s v1.21.
    let (ok, out) = run_kubectl(&kubeconfig, &["logs", "web"]).await;
    assert!(
        !ok && out.contains(&format!("dial tcp: lookup {name}: no such host")),
        "{out}"
    );
    let identity = server.client_cert(&format!("system:node:{name}"), &["system:nodes"]);
    let connects = bridge(agent(server.addr, &server.cluster_ca_pem(), &identity).await);
    wait_sessions(&server, name, 1).await;
    let (ok, out) = run_kubectl(&kubeconfig, &["logs", "web"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, "one\ntwo\n");
    assert_eq!(
        connects.lock().expect("connects").clone(),
        vec![format!("tcp/127.0.0.1:{port}")]
    );
    // TLS inside the tunnel names the host the API server dialed.
    assert_eq!(
        seen.lock().expect("seen").clone(),
        vec![(
            "GET /containerLogs/default/web/main HTTP/1.1".to_string(),
            name.to_string()
        )]
    );
    // The agent cannot reach its kubelet: in-process, the API server reads its Error.
    let down = "fake-k3s-agent-down";
    let refused = closed_port().await;
    create(
        &client,
        "/api/v1/nodes",
        node(down, &[("Hostname", down)], refused),
    )
    .await;
    create(
        &client,
        "/api/v1/namespaces/default/pods",
        pod("down", down),
    )
    .await;
    let identity = server.client_cert(&format!("system:node:{down}"), &["system:nodes"]);
    let _connects = bridge(agent(server.addr, &server.cluster_ca_pem(), &identity).await);
    wait_sessions(&server, down, 1).await;
    let status = get_status(&client, "/api/v1/namespaces/default/pods/down/log").await;
    assert_eq!(status.code, 500);
    assert_eq!(
        status.message,
        format!("Get \"https://{down}:{refused}/containerLogs/default/down/main\": dial tcp 127.0.0.1:{refused}: connect: connection refused")
    );
}

#[tokio::test]
async fn each_frontend_has_its_own_sessions() {
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let client = admin(&server).await;
    let second_url = server.add_frontend();
    let second: SocketAddr = second_url
        .strip_prefix("https://")
        .expect("https")
        .parse()
        .expect("addr");
    let endpoints = server
        .object("endpoints", "default", "kubernetes")
        .expect("endpoints");
    let ports: Vec<u64> = endpoints["subsets"]
        .as_array()
        .expect("subsets")
        .iter()
        .map(|s| s["ports"][0]["port"].as_u64().expect("port"))
        .collect();
    assert_eq!(
        ports,
        vec![u64::from(server.addr.port()), u64::from(second.port())]
    );
    let (cert, key) = serving_cert(&client, "n1", &["n1"]).await;
    let (port, _) = kubelet(&cert, &key).await;
    create(
        &client,
        "/api/v1/nodes",
        node("n1", &[("InternalIP", "127.0.0.1")], port),
    )
    .await;
    create(&client, "/api/v1/namespaces/default/pods", pod("web", "n1")).await;
    // The agent is connected to the second server only.
    let n1 = server.client_cert("system:node:n1", &["system:nodes"]);
    let _connects = bridge(agent(second, &server.cluster_ca_pem(), &n1).await);
    wait_sessions(&server, "n1", 1).await;
    let status = get_status(&client, "/api/v1/namespaces/default/pods/web/log").await;
    assert!(
        status
            .message
            .contains(&format!("proxy error from {} while dialing", server.addr)),
        "{}",
        status.message
    );
    // The same request at the second server goes through.
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = server.write_kubeconfig(dir.path());
    let text = std::fs::read_to_string(&kubeconfig)
        .expect("kubeconfig")
        .replace(&server.url(), &second_url);
    std::fs::write(&kubeconfig, text).expect("kubeconfig");
    let (ok, out) = run_kubectl(&kubeconfig, &["logs", "web"]).await;
    assert!(ok, "{out}");
    assert_eq!(out, "one\ntwo\n");
}

#[tokio::test]
async fn kubelet_client_csrs_are_auto_approved_after_a_subject_access_review() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let server = FakeApiServer::start_k3s(K3sRouting::Agent).await;
    let admin = admin(&server).await;
    // The bootstrap policy's roles are there, unbound.
    let role = server
        .object(
            "clusterroles",
            "",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
        )
        .expect("role");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/nodeclient"], "verbs": ["create"]}])
    );
    create(
        &admin,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        json!({
            "metadata": {"name": "bootstrap-nodeclient"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:certificates.k8s.io:certificatesigningrequests:nodeclient"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bootstrapper"}],
        }),
    )
    .await;
    const SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
    let usages = ["digital signature", "client auth"];
    let bootstrapper = server.client_cert("bootstrapper", &["system:bootstrappers"]);
    let api: Api<CertificateSigningRequest> = Api::all(cert_client(&server, &bootstrapper).await);
    let (pem, key) = make_csr("system:node:n1", &["system:nodes"], &[], &[]);
    let created = api
        .create(
            &PostParams::default(),
            &csr_object("n1-client", &pem, SIGNER, &usages),
        )
        .await
        .expect("create");
    assert_eq!(created.spec.username.as_deref(), Some("bootstrapper"));
    assert_eq!(
        created.spec.groups,
        Some(vec![
            "system:bootstrappers".to_string(),
            "system:authenticated".to_string()
        ])
    );
    let csr = api.get("n1-client").await.expect("csr");
    let status = csr.status.expect("status");
    let condition = &status.conditions.as_ref().expect("conditions")[0];
    assert_eq!(
        (
            condition.type_.as_str(),
            condition.status.as_str(),
            condition.reason.as_deref(),
            condition.message.as_deref()
        ),
        (
            "Approved",
            "True",
            Some("AutoApproved"),
            Some("Auto approving kubelet client certificate after SubjectAccessReview.")
        )
    );
    let cert_pem = String::from_utf8(status.certificate.expect("signed").0).expect("pem");
    let der = pem_der(&cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).expect("cert");
    let ca_der = pem_der(&server.client_ca_pem());
    let (_, ca) = X509Certificate::from_der(&ca_der).expect("ca");
    cert.verify_signature(Some(ca.public_key()))
        .expect("signed by the client CA");
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(eku.client_auth && !eku.server_auth);
    // The issued certificate opens a tunnel session as n1.
    let issued = (cert_pem.clone(), key.serialize_pem());
    let _ws = agent(server.addr, &server.cluster_ca_pem(), &issued).await;
    wait_sessions(&server, "n1", 1).await;
    // Renewal by the node itself: selfnodeclient, once a binding allows it.
    create(
        &admin,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        json!({
            "metadata": {"name": "nodes-selfnodeclient"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
        }),
    )
    .await;
    let as_node: Api<CertificateSigningRequest> = Api::all(cert_client(&server, &issued).await);
    let (pem, _) = make_csr("system:node:n1", &["system:nodes"], &[], &[]);
    as_node
        .create(
            &PostParams::default(),
            &csr_object("n1-renew", &pem, SIGNER, &usages),
        )
        .await
        .expect("create");
    let renewed = as_node.get("n1-renew").await.expect("csr");
    let status = renewed.status.expect("status");
    assert_eq!(
        status.conditions.expect("conditions")[0].message.as_deref(),
        Some("Auto approving self kubelet client certificate after SubjectAccessReview.")
    );
    assert!(status.certificate.is_some());
    // Someone without either role: pending until a binding lets them.
    let stranger = server.client_cert("stranger", &[]);
    let as_stranger: Api<CertificateSigningRequest> =
        Api::all(cert_client(&server, &stranger).await);
    let (pem, _) = make_csr("system:node:n2", &["system:nodes"], &[], &[]);
    as_stranger
        .create(
            &PostParams::default(),
            &csr_object("n2-client", &pem, SIGNER, &usages),
        )
        .await
        .expect("create");
    let pending = as_stranger.get("n2-client").await.expect("csr");
    assert!(pending
        .status
        .as_ref()
        .is_none_or(|s| s.conditions.is_none() && s.certificate.is_none()));
    create(
        &admin,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        json!({
            "metadata": {"name": "stranger-nodeclient"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:certificates.k8s.io:certificatesigningrequests:nodeclient"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "stranger"}],
        }),
    )
    .await;
    let now_approved = as_stranger.get("n2-client").await.expect("csr");
    assert!(now_approved.status.and_then(|s| s.certificate).is_some());
    // Not a kubelet client request (a DNS name): never auto-approved; approved by
    // hand, the signer fails it.
    let (pem, _) = make_csr("system:node:n3", &["system:nodes"], &[], &["n3"]);
    api.create(
        &PostParams::default(),
        &csr_object("n3-client", &pem, SIGNER, &usages),
    )
    .await
    .expect("create");
    let admin_api: Api<CertificateSigningRequest> = Api::all(admin.clone());
    assert!(admin_api
        .get("n3-client")
        .await
        .expect("csr")
        .status
        .is_none_or(|s| s.conditions.is_none()));
    approve(&admin_api, "n3-client").await;
    let failed = admin_api.get("n3-client").await.expect("csr");
    let status = failed.status.expect("status");
    let failure = status
        .conditions
        .expect("conditions")
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed");
    assert_eq!(failure.reason.as_deref(), Some("SignerValidationFailure"));
    assert_eq!(
        failure.message.as_deref(),
        Some("DNS subjectAltNames are not allowed")
    );
    assert!(status.certificate.is_none());
    // The test-only knob: short-lived client certificates.
    server.set_client_cert_ttl(Some(60));
    let (pem, _) = make_csr("system:node:n4", &["system:nodes"], &[], &[]);
    api.create(
        &PostParams::default(),
        &csr_object("n4-client", &pem, SIGNER, &usages),
    )
    .await
    .expect("create");
    let short = api.get("n4-client").await.expect("csr");
    let pem = String::from_utf8(short.status.and_then(|s| s.certificate).expect("signed").0)
        .expect("pem");
    let der = pem_der(&pem);
    let (_, cert) = X509Certificate::from_der(&der).expect("cert");
    let left = cert.validity().not_after.timestamp()
        - std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs() as i64;
    assert!((50..=61).contains(&left), "{left} s left");
}
