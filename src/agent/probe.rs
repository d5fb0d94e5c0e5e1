//! Liveness, readiness and startup probes, run the way the kubelet runs them.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, HTTPGetAction, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::runtime::Runtime;

/// A probe's configuration with the kubelet's defaults applied.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    probe: Probe,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

fn secs(value: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(value.unwrap_or(default).max(0) as u64)
}

impl ProbeSpec {
    pub fn new(probe: &Probe) -> ProbeSpec {
        ProbeSpec {
            probe: probe.clone(),
            initial_delay: secs(probe.initial_delay_seconds, 0),
            period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
            success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// The running tally of one probe on one container instance.
#[derive(Debug, Clone)]
pub struct ProbeState {
    pub spec: ProbeSpec,
    next_at: Instant,
    successes: u32,
    failures: u32,
    /// The settled result: Some(true) after `success_threshold` successes in a row,
    /// Some(false) after `failure_threshold` failures in a row.
    pub result: Option<bool>,
    pub last_message: String,
}

impl ProbeState {
    pub fn new(spec: ProbeSpec, container_started: Instant) -> ProbeState {
        ProbeState {
            next_at: container_started + spec.initial_delay,
            spec,
            successes: 0,
            failures: 0,
            result: None,
            last_message: String::new(),
        }
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_at
    }

    /// Records one probe outcome and returns the settled result.
    pub fn record(&mut self, ok: bool, message: String, now: Instant) -> Option<bool> {
        self.next_at = now + self.spec.period;
        self.last_message = message;
        if ok {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= self.spec.success_threshold {
                self.result = Some(true);
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= self.spec.failure_threshold {
                self.result = Some(false);
            }
        }
        self.result
    }
}

/// Runs a probe once: Ok(()) on success, Err(message) on failure.
pub async fn run(
    spec: &ProbeSpec,
    runtime: &dyn Runtime,
    container_id: &str,
    container: &Container,
    pod_ip: Option<IpAddr>,
) -> Result<(), String> {
    let probe = &spec.probe;
    if let Some(exec) = &probe.exec {
        let cmd = exec.command.clone().unwrap_or_default();
        return match runtime.exec(container_id, &cmd, spec.timeout).await {
            Ok(out) if out.exit_code == 0 => Ok(()),
            // The kubelet's exec prober says only what the command printed.
            Ok(out) => Err(String::from_utf8_lossy(&out.output).trim_end().to_string()),
            Err(e) => Err(format!("command {cmd:?} failed: {e}")),
        };
    }
    if let Some(http) = &probe.http_get {
        let code = HttpTarget::of(http, container, pod_ip)?
            .get(spec.timeout)
            .await?;
        // Success is a status from 200 to 399, as the kubelet's.
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = resolve_port(&tcp.port, container)?;
        let host = match &tcp.host {
            Some(h) if !h.is_empty() => h.clone(),
            _ => pod_ip.ok_or("pod has no IP yet")?.to_string(),
        };
        return match tokio::time::timeout(spec.timeout, TcpStream::connect((host.as_str(), port)))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
        };
    }
    Err("probe has no handler (exec, httpGet or tcpSocket)".into())
}

/// Where the httpGet action of a probe or a lifecycle hook goes.
pub struct HttpTarget {
    host: String,
    port: u16,
    path: String,
    headers: Vec<(String, String)>,
}

impl HttpTarget {
    /// The action's host (the pod's IP when unset), port (a number or the container's
    /// named port), path and headers; HTTPS is refused.
    pub fn of(
        action: &HTTPGetAction,
        container: &Container,
        pod_ip: Option<IpAddr>,
    ) -> Result<HttpTarget, String> {
        if action
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
        {
            return Err("HTTPS is not supported for probes and hooks".into());
        }
        let host = match &action.host {
            Some(h) if !h.is_empty() => h.clone(),
            _ => pod_ip.ok_or("pod has no IP yet")?.to_string(),
        };
        Ok(HttpTarget {
            host,
            port: resolve_port(&action.port, container)?,
            path: action.path.clone().unwrap_or_else(|| "/".into()),
            headers: action
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The status code of a GET, within `timeout`.
    pub async fn get(&self, timeout: Duration) -> Result<u16, String> {
        let (host, port, path) = (&self.host, self.port, &self.path);
        tokio::time::timeout(timeout, http_get(host, port, path, &self.headers))
            .await
            .map_err(|_| format!("Get \"http://{host}:{port}{path}\": timeout after {timeout:?}"))?
    }
}

fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("container has no port named {name:?}")),
    }
}

/// A minimal HTTP/1.1 GET: the status code of the answer.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, String> {
    let url = format!("http://{host}:{port}{path}");
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/beemesh\r\nAccept: */*\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream
            .read(&mut head[read..])
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&head[..read]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("Get \"{url}\": malformed HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ContainerPort;

    #[test]
    fn tally_settles_after_thresholds() {
        let spec = ProbeSpec::new(&Probe {
            failure_threshold: Some(2),
            success_threshold: Some(1),
            ..Default::default()
        });
        let now = Instant::now();
        let mut state = ProbeState::new(spec, now);
        assert!(state.due(now));
        assert_eq!(state.record(false, "x".into(), now), None);
        assert!(!state.due(now));
        assert_eq!(state.record(false, "x".into(), now), Some(false));
        assert_eq!(state.record(true, String::new(), now), Some(true));
    }

    #[test]
    fn named_ports_resolve_through_the_container() {
        let c = Container {
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert_eq!(
            resolve_port(&IntOrString::String("http".into()), &c),
            Ok(8080)
        );
        assert!(resolve_port(&IntOrString::String("nope".into()), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(70000), &c).is_err());
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            for code in [200, 500] {
                if let Ok((mut s, _)) = listener.accept().await {
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                }
            }
        });
        assert_eq!(http_get("127.0.0.1", port, "/ok", &[]).await, Ok(200));
        assert_eq!(http_get("127.0.0.1", port, "/fail", &[]).await, Ok(500));
        assert!(http_get("127.0.0.1", 1, "/", &[]).await.is_err());
    }
}
