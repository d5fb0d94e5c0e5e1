//! The k3s agent tunnel, opened by the node as a k3s agent opens it, so that a stock k3s
//! server reaches the kubelet API: k3s sends every API-server-to-kubelet connection for
//! a Node's address through that Node's own session (pkg/daemons/control/tunnel.go,
//! `dialBackend`; k3s 1.21 and older route by the Hostname address the same way) and
//! answers 502 when there is none.
//!
//! A session is `wss://<server>/v1-k3s/connect` with a client certificate for
//! `system:node:<node name>` (see [`super::csr`]), speaking rancher/remotedialer's
//! protocol ([`frame`], [`session`]). There is one per API server address (the
//! `default/kubernetes` Endpoints, as k3s agents follow them; the kubeconfig's server when
//! they cannot be read), each reconnecting with backoff and jitter. Tunnelled
//! connections go to the kubelet API on loopback, with the same TLS, authentication and
//! authorization as any other.

pub mod frame;
pub mod session;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Endpoints;
use kube::Client;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

use super::csr::{self, CertKind, CertSlot, CertSpec};
use crate::metrics::Metrics;
use session::SessionConfig;

/// The tunnel endpoint of k3s's supervisor (`/v1-<program>/connect`).
pub const CONNECT_PATH: &str = "/v1-k3s/connect";
/// What k3s's supervisor answers, to anyone, with `pong`, in front of its API server
/// (its tunnel path itself answers 403 to anyone but a node, as an API server would).
const PING_PATH: &str = "/ping";
/// How often the list of API servers is read again.
const SERVERS_REFRESH: Duration = Duration::from_secs(60);
/// Reconnect delays grow from the first to the last, with jitter.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that lasted this long starts the backoff afresh.
const STABLE_SESSION: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `--k3s-tunnel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TunnelMode {
    /// On when the API server is k3s (its version carries `+k3s`).
    #[default]
    Auto,
    /// Always; the start fails if the server has no tunnel endpoint.
    On,
    /// Never: the API server dials the kubelet API directly.
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "the API server at {server} has no k3s agent tunnel endpoint: it is not a k3s \
         server (GET {PING_PATH} answered {answer}, not k3s's \"pong\"), so \
         --k3s-tunnel=on cannot work. Use --k3s-tunnel=auto or off"
    )]
    NoEndpoint { server: String, answer: String },
    #[error("cannot probe the API server for the k3s tunnel endpoint")]
    Probe(#[source] kube::Error),
    #[error("the API server's address {0} cannot be used for the tunnel")]
    Address(String),
    #[error("the kubeconfig skips TLS verification of the API server; the tunnel will not send its client certificate to an unverified server")]
    Unverified,
    #[error("the kubeconfig names no CA for the API server (certificate-authority); the tunnel trusts only that")]
    NoCa,
    #[error("the API server's CA is unusable")]
    Ca(#[source] rustls::Error),
}

/// How to reach and trust the API server, from the node's kubeconfig.
#[derive(Debug, Clone)]
pub struct ApiServer {
    /// `host:port` of the kubeconfig's server.
    pub authority: String,
    /// Its CA certificates.
    pub roots: Arc<rustls::RootCertStore>,
    /// The TLS server name the kubeconfig asks for, if any.
    pub tls_server_name: Option<String>,
}

impl ApiServer {
    pub fn from_config(config: &kube::Config) -> Result<Self, TunnelError> {
        if config.accept_invalid_certs {
            return Err(TunnelError::Unverified);
        }
        let url = &config.cluster_url;
        let authority = url
            .authority()
            .map(|a| match a.port() {
                Some(_) => a.to_string(),
                None => format!("{}:443", a.host()),
            })
            .ok_or_else(|| TunnelError::Address(url.to_string()))?;
        let roots = root_store(config.root_cert.as_deref().unwrap_or_default())?;
        Ok(ApiServer {
            authority,
            roots,
            tls_server_name: config.tls_server_name.clone(),
        })
    }
}

/// What the tunnel needs to know about the node.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub mode: TunnelMode,
    pub node_name: String,
    pub kubelet_port: u16,
    /// Where the client certificate is kept (the kubelet state directory).
    pub dir: PathBuf,
}

/// How many sessions are up; the Node reports a Hostname address while any is.
pub type SessionsUp = watch::Receiver<usize>;

/// Starts the tunnel as `--k3s-tunnel` says: `on` checks now that the server has the
/// tunnel endpoint and fails if not; `auto` decides in the background (the API server
/// may not answer yet) and opens it only to k3s (a version carrying `+k3s`).
pub async fn start(
    config: TunnelConfig,
    client: Client,
    kube_config: &kube::Config,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<SessionsUp, TunnelError> {
    let (up_tx, up_rx) = watch::channel(0usize);
    match config.mode {
        TunnelMode::Off => {}
        TunnelMode::On => {
            check_endpoint(&client, &kube_config.cluster_url).await?;
            let server = ApiServer::from_config(kube_config)?;
            tokio::spawn(run(config, client, server, metrics, up_tx, cancel));
        }
        TunnelMode::Auto => {
            let server = ApiServer::from_config(kube_config);
            let url = kube_config.cluster_url.clone();
            tokio::spawn(async move {
                let decided = tokio::select! {
                    _ = cancel.cancelled() => return,
                    decided = decide(&client, &url, server) => decided,
                };
                if let Some(server) = decided {
                    run(config, client, server, metrics, up_tx, cancel).await;
                }
            });
        }
    }
    Ok(up_rx)
}

/// `auto`: the server to tunnel to if the API server is k3s with a tunnel endpoint.
async fn decide(
    client: &Client,
    url: &http::Uri,
    server: Result<ApiServer, TunnelError>,
) -> Option<ApiServer> {
    let version = loop {
        match client.apiserver_version().await {
            Ok(version) => break version.git_version,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the API server's version yet");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    };
    if !version.contains("+k3s") {
        tracing::info!(%version, "the API server is not k3s: no agent tunnel (--k3s-tunnel=auto)");
        return None;
    }
    match check_endpoint(client, url).await.and(server) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "k3s without an agent tunnel: kubectl logs and exec need the server's --egress-selector-mode=disabled");
            None
        }
    }
}

/// Fails unless k3s's supervisor, which serves the tunnel, is in front of the API server.
async fn check_endpoint(client: &Client, url: &http::Uri) -> Result<(), TunnelError> {
    let request = http::Request::get(PING_PATH)
        .body(Vec::new())
        .map_err(|e| TunnelError::Probe(kube::Error::HttpError(e)))?;
    let response = client
        .send(request.map(Into::into))
        .await
        .map_err(TunnelError::Probe)?;
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status == http::StatusCode::OK && body.as_ref() == b"pong" {
        return Ok(());
    }
    Err(TunnelError::NoEndpoint {
        server: url.to_string(),
        answer: status.to_string(),
    })
}

fn root_store(roots: &[Vec<u8>]) -> Result<Arc<rustls::RootCertStore>, TunnelError> {
    if roots.is_empty() {
        return Err(TunnelError::NoCa);
    }
    let mut store = rustls::RootCertStore::empty();
    for der in roots {
        store
            .add(rustls::pki_types::CertificateDer::from(der.clone()))
            .map_err(TunnelError::Ca)?;
    }
    Ok(Arc::new(store))
}

/// Gets the client certificate, then keeps one session per API server until cancelled.
async fn run(
    config: TunnelConfig,
    client: Client,
    server: ApiServer,
    metrics: Metrics,
    up: watch::Sender<usize>,
    cancel: CancellationToken,
) {
    let spec = CertSpec {
        node_name: config.node_name.clone(),
        kind: CertKind::Client,
    };
    let slot = loop {
        let obtained = tokio::select! {
            _ = cancel.cancelled() => return,
            obtained = csr::obtain(&client, &spec, &config.dir) => obtained,
        };
        match obtained {
            Ok(issued) => {
                let slot = CertSlot::new(issued.key);
                tokio::spawn(csr::keep_renewed(
                    client.clone(),
                    spec.clone(),
                    config.dir.clone(),
                    slot.clone(),
                    issued.renew_at,
                ));
                break slot;
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "no tunnel client certificate from the cluster yet; asking again in 30 s");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    };
    tracing::info!(node = %config.node_name, "opening the k3s agent tunnel");
    let tls = {
        let mut tls = rustls::ClientConfig::builder()
            .with_root_certificates(server.roots.clone())
            .with_client_cert_resolver(slot);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(tls)
    };
    let session_config = SessionConfig::new(config.kubelet_port);
    let up = Arc::new(up);
    let mut sessions: HashMap<String, CancellationToken> = HashMap::new();
    loop {
        let wanted = servers(&client, &server).await;
        sessions.retain(|authority, stop| {
            let keep = wanted.contains(authority);
            if !keep {
                tracing::info!(server = %authority, "API server gone: closing its tunnel session");
                stop.cancel();
            }
            keep
        });
        for authority in wanted {
            if sessions.contains_key(&authority) {
                continue;
            }
            let stop = cancel.child_token();
            sessions.insert(authority.clone(), stop.clone());
            let server_name = if authority == server.authority {
                server.tls_server_name.clone()
            } else {
                None
            };
            let keeper = SessionKeeper {
                authority,
                server_name,
                tls: tls.clone(),
                config: session_config.clone(),
                metrics: metrics.clone(),
                up: up.clone(),
            };
            tokio::spawn(keeper.run(stop));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(SERVERS_REFRESH) => {}
        }
    }
}

/// The API servers to keep sessions with: every address of the `default/kubernetes`
/// Endpoints (one session per server in HA), else the kubeconfig's server.
async fn servers(client: &Client, server: &ApiServer) -> Vec<String> {
    let endpoints: kube::Api<Endpoints> = kube::Api::namespaced(client.clone(), "default");
    let listed = match endpoints.get("kubernetes").await {
        Ok(endpoints) => endpoint_authorities(&endpoints),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read default/kubernetes Endpoints; using the kubeconfig's server");
            Vec::new()
        }
    };
    if listed.is_empty() {
        vec![server.authority.clone()]
    } else {
        listed
    }
}

/// `ip:port` of each address of the Endpoints' `https` port (or only port).
fn endpoint_authorities(endpoints: &Endpoints) -> Vec<String> {
    let mut found = Vec::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports = subset.ports.clone().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some("https"))
            .or(ports.first())
            .map(|p| p.port);
        let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for address in subset.addresses.iter().flatten() {
            let authority = match address.ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
                Ok(ip) => format!("{ip}:{port}"),
                Err(_) => continue,
            };
            if !found.contains(&authority) {
                found.push(authority);
            }
        }
    }
    found
}

/// Keeps one session with one API server open.
struct SessionKeeper {
    authority: String,
    server_name: Option<String>,
    tls: Arc<rustls::ClientConfig>,
    config: SessionConfig,
    metrics: Metrics,
    up: Arc<watch::Sender<usize>>,
}

impl SessionKeeper {
    async fn run(self, stop: CancellationToken) {
        let gauge = self.metrics.tunnel_up(&self.authority);
        let mut delay = BACKOFF_FIRST;
        loop {
            let connected = tokio::select! {
                _ = stop.cancelled() => break,
                connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect()) => connected,
            };
            match connected {
                Ok(Ok(websocket)) => {
                    tracing::info!(server = %self.authority, "k3s agent tunnel session up");
                    let since = tokio::time::Instant::now();
                    gauge.set(1);
                    self.up.send_modify(|n| *n += 1);
                    let end = session::serve(websocket, &self.config, &self.metrics, &stop).await;
                    self.up.send_modify(|n| *n = n.saturating_sub(1));
                    gauge.set(0);
                    if matches!(end, session::SessionEnd::Cancelled) {
                        break;
                    }
                    tracing::warn!(server = %self.authority, reason = %end, "k3s agent tunnel session ended; reconnecting");
                    if since.elapsed() >= STABLE_SESSION {
                        delay = BACKOFF_FIRST;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(server = %self.authority, error = %e, "cannot open the k3s agent tunnel; retrying")
                }
                Err(_) => {
                    tracing::warn!(server = %self.authority, "opening the k3s agent tunnel timed out; retrying")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(jittered(delay)) => {}
            }
            delay = (delay * 2).min(BACKOFF_MAX);
        }
        gauge.set(0);
    }

    async fn connect(
        &self,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        String,
    > {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| format!("dial {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        let host = self
            .authority
            .rsplit_once(':')
            .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or(&self.authority);
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
            .map_err(|e| format!("invalid server name {name}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS with {}: {e}", self.authority))?;
        let url = format!("wss://{}{CONNECT_PATH}", self.authority);
        let websocket_config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(session::MAX_MESSAGE))
            .max_frame_size(Some(session::MAX_MESSAGE));
        match tokio_tungstenite::client_async_with_config(url, tls, Some(websocket_config)).await {
            Ok((websocket, _)) => Ok(websocket),
            Err(tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect::<String>();
                let hint = match response.status().as_u16() {
                    401 => ": the server refused the node's client certificate",
                    404 => ": the server has no k3s agent tunnel endpoint",
                    _ => "",
                };
                Err(format!(
                    "{} answered {}{hint} {body}",
                    self.authority,
                    response.status()
                ))
            }
            Err(e) => Err(format!("WebSocket handshake with {}: {e}", self.authority)),
        }
    }
}

/// `delay` scaled by a random factor in [0.5, 1.5), so that nodes do not reconnect in step.
fn jittered(delay: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::getrandom(&mut byte);
    delay.mul_f64(0.5 + f64::from(byte[0]) / 256.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset};

    #[test]
    fn one_session_per_api_server_address() {
        let address = |ip: &str| EndpointAddress {
            ip: ip.into(),
            ..Default::default()
        };
        let endpoints = Endpoints {
            subsets: Some(vec![EndpointSubset {
                addresses: Some(vec![
                    address("10.0.0.1"),
                    address("fd00::2"),
                    address("bad"),
                ]),
                ports: Some(vec![
                    EndpointPort {
                        name: Some("other".into()),
                        port: 1,
                        ..Default::default()
                    },
                    EndpointPort {
                        name: Some("https".into()),
                        port: 6443,
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            endpoint_authorities(&endpoints),
            vec!["10.0.0.1:6443".to_string(), "[fd00::2]:6443".to_string()]
        );
        assert!(endpoint_authorities(&Endpoints::default()).is_empty());
    }

    #[test]
    fn the_kubeconfig_names_the_server_and_its_trust() {
        let mut config = kube::Config::new("https://k3s.example:6443".parse().expect("url"));
        assert!(matches!(
            ApiServer::from_config(&config),
            Err(TunnelError::NoCa)
        ));
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("ca");
        config.root_cert = Some(vec![ca.cert.der().to_vec()]);
        let server = ApiServer::from_config(&config).expect("server");
        assert_eq!(server.authority, "k3s.example:6443");
        config.cluster_url = "https://10.43.0.1".parse().expect("url");
        assert_eq!(
            ApiServer::from_config(&config).expect("server").authority,
            "10.43.0.1:443"
        );
        config.accept_invalid_certs = true;
        assert!(matches!(
            ApiServer::from_config(&config),
            Err(TunnelError::Unverified)
        ));
    }

    #[test]
    fn jitter_stays_within_half_either_way() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d < Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}
