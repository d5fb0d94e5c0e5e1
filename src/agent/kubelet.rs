//! The agent's side of the kubelet API: requests its pods' owners relay over
//! [`KUBELET_PROTOCOL`] streams, served from Podman. Streams of peers that are not
//! trusted owners are closed unread; only a pod's owner may ask about it; Podman's
//! labels say which pod, container, instance and owner each container is.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use libp2p::{PeerId, StreamProtocol};
use tokio::io::AsyncWriteExt;
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use super::addresses::PodAddresses;
use crate::audit::{self, Outcome};
use crate::kubelet::relay::{
    read_frame, read_frame_within, read_header, relay_datagrams, splice, write_frame, write_header,
    Exit, Frame, RelayError,
};
use crate::mesh::{MeshError, MeshHandle};
use crate::metrics::Metrics;
use crate::runtime::{
    labels, ContainerStatus, Interactive, LogOptions, Output, Runtime, RuntimeContainer,
    RuntimeError, RuntimePod, SessionControl, Streams, TerminalSize,
};
use crate::trust::TrustedPeers;
use crate::wire::{
    ContainerUsage, KubeletAnswer, KubeletRequest, PodRef, PodUid, PodUsage, KUBELET_PROTOCOL,
};

/// Accepts kubelet streams until cancelled.
pub async fn serve(
    mesh: MeshHandle,
    runtime: Arc<dyn Runtime>,
    addresses: PodAddresses,
    owners: TrustedPeers,
    metrics: Metrics,
    cancel: CancellationToken,
) -> Result<(), MeshError> {
    let mut incoming = mesh.accept_streams(StreamProtocol::new(KUBELET_PROTOCOL))?;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = incoming.next() => {
                let Some((peer, stream)) = next else { return Ok(()) };
                if !owners.trusts(&peer) {
                    metrics.dropped("kubelet_stream", "untrusted");
                    audit::record(&metrics, "kubelet_stream", Outcome::Refused, &peer, None, &"owner not trusted");
                    drop(stream);
                    continue;
                }
                let runtime = runtime.clone();
                let metrics = metrics.clone();
                let addresses = addresses.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(peer, stream, runtime.as_ref(), &addresses, &metrics).await {
                        tracing::debug!(%peer, error = %e, "kubelet stream ended with an error");
                    }
                });
            }
        }
    }
}

async fn handle(
    peer: PeerId,
    stream: libp2p::Stream,
    runtime: &dyn Runtime,
    addresses: &PodAddresses,
    metrics: &Metrics,
) -> Result<(), RelayError> {
    let mut io = stream.compat();
    let request: KubeletRequest = read_header(&mut io).await?;
    tracing::debug!(%peer, ?request, "kubelet request");
    audit::record(
        metrics,
        request.verb(),
        Outcome::Allowed,
        &peer,
        request.pod().map(|p| p as &dyn std::fmt::Display),
        &"relayed by the pod's owner",
    );
    match request {
        KubeletRequest::Logs {
            pod,
            container,
            follow,
            tail_lines,
            timestamps,
            since,
            previous,
        } => {
            let found = find_container(runtime, peer, &pod, &container, previous).await;
            let id = match found {
                Ok(id) => id,
                Err(failed) => return write_header(&mut io, &failed).await,
            };
            let options = LogOptions {
                follow,
                tail_lines,
                timestamps,
                since: since.and_then(|s| Timestamp::from_second(s).ok()),
            };
            let mut logs = match runtime.logs(&id, &options).await {
                Ok(logs) => logs,
                Err(e) => return write_header(&mut io, &failed(500, e.to_string())).await,
            };
            write_header(&mut io, &KubeletAnswer::Ok).await?;
            while let Some(chunk) = logs.next().await {
                match chunk {
                    Ok(bytes) => io.write_all(&bytes).await?,
                    Err(e) => {
                        tracing::debug!(error = %e, "log stream broke off");
                        break;
                    }
                }
            }
            io.shutdown().await?;
            Ok(())
        }
        KubeletRequest::Exec {
            pod,
            container,
            command,
            streams,
        } => {
            let session = Session::Exec(&command);
            interactive(io, runtime, peer, &pod, &container, session, streams).await
        }
        KubeletRequest::Attach {
            pod,
            container,
            streams,
        } => {
            interactive(
                io,
                runtime,
                peer,
                &pod,
                &container,
                Session::Attach,
                streams,
            )
            .await
        }
        KubeletRequest::PortForward { pod, port } => {
            let connected = reach_pod(runtime, addresses, peer, &pod, port, "connect to", |to| {
                tokio::net::TcpStream::connect(to)
            });
            let mut tcp = match connected.await {
                Ok(tcp) => tcp,
                Err(refused) => return write_header(&mut io, &refused).await,
            };
            write_header(&mut io, &KubeletAnswer::Ok).await?;
            splice(&mut io, &mut tcp).await?;
            Ok(())
        }
        KubeletRequest::UdpForward { pod, port } => {
            let connected = reach_pod(
                runtime,
                addresses,
                peer,
                &pod,
                port,
                "open UDP to",
                udp_socket_to,
            );
            let socket = match connected.await {
                Ok(socket) => socket,
                Err(refused) => return write_header(&mut io, &refused).await,
            };
            write_header(&mut io, &KubeletAnswer::Ok).await?;
            relay_datagrams(io, &socket).await
        }
        KubeletRequest::Stats => {
            let usage = match owner_usage(runtime, peer).await {
                Ok(usage) => usage,
                Err(e) => return write_header(&mut io, &failed(500, e.to_string())).await,
            };
            write_header(&mut io, &KubeletAnswer::Ok).await?;
            let body = serde_json::to_vec(&usage).map_err(std::io::Error::other)?;
            io.write_all(&body).await?;
            io.shutdown().await?;
            Ok(())
        }
    }
}

/// Usage of the running containers of `owner`'s pods on this agent (newest copy of
/// each pod).
async fn owner_usage(runtime: &dyn Runtime, owner: PeerId) -> Result<Vec<PodUsage>, RuntimeError> {
    let pods = runtime.list_pods(labels::OWNER, &owner.to_string()).await?;
    let running: Vec<String> = pods
        .iter()
        .flat_map(|p| &p.containers)
        .filter(|c| c.state.status == ContainerStatus::Running)
        .map(|c| c.id.clone())
        .collect();
    let usage = runtime.usage(&running).await?;
    Ok(pods
        .iter()
        .map(|pod| PodUsage {
            pod: PodRef {
                uid: PodUid(label(&pod.labels, labels::POD_UID)),
                namespace: label(&pod.labels, labels::POD_NAMESPACE),
                name: label(&pod.labels, labels::POD_NAME),
            },
            containers: pod
                .containers
                .iter()
                .filter_map(|c| {
                    let used = usage.get(&c.id)?;
                    Some(ContainerUsage {
                        name: label(&c.labels, labels::CONTAINER),
                        cpu_nanos: used.cpu_nanos,
                        memory_bytes: used.memory_bytes,
                        started_at: c.state.started_at.map(|t| t.as_second()),
                    })
                })
                .collect(),
        })
        .filter(|pod| !pod.containers.is_empty())
        .collect())
}

/// What an interactive session connects to.
enum Session<'a> {
    Exec(&'a [String]),
    Attach,
}

/// Starts an exec or attach on the pod's current container and carries it.
async fn interactive<T>(
    mut io: T,
    runtime: &dyn Runtime,
    owner: PeerId,
    pod: &PodUid,
    container: &str,
    session: Session<'_>,
    streams: Streams,
) -> Result<(), RelayError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let id = match find_container(runtime, owner, pod, container, false).await {
        Ok(id) => id,
        Err(failed) => return write_header(&mut io, &failed).await,
    };
    let started = match session {
        // A terminal's size comes as the session's first frame, once the node has our
        // answer and the client its upgrade: so answer first, and give the command the
        // size it reads at start. A start that fails then ends the session with its error.
        Session::Exec(command) if streams.tty => {
            write_header(&mut io, &KubeletAnswer::Ok).await?;
            let (size, first) = match read_frame_within(&mut io, Some(FIRST_SIZE_WAIT)).await? {
                Some(Frame::Resize { width, height }) => {
                    (Some(TerminalSize { width, height }), None)
                }
                other => (None, other),
            };
            match runtime.exec_interactive(&id, command, streams, size).await {
                Ok(session) => return run_session(io, session, first).await,
                Err(e) => {
                    write_frame(&mut io, &Frame::Exit(Exit::Error(e.to_string()))).await?;
                    return Ok(io.shutdown().await?);
                }
            }
        }
        Session::Exec(command) => runtime.exec_interactive(&id, command, streams, None).await,
        Session::Attach => runtime.attach(&id, streams).await,
    };
    let session = match started {
        Ok(session) => session,
        Err(e) => return write_header(&mut io, &failed(500, e.to_string())).await,
    };
    write_header(&mut io, &KubeletAnswer::Ok).await?;
    run_session(io, session, None).await
}

/// How long a terminal exec waits for the client's size before it starts without one
/// (kubectl sends it at once).
const FIRST_SIZE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Carries an exec session's frames (`first` already read) until its output ends, then
/// sends how it ended. The node closing the stream ends the input side (and so the
/// command's stdin).
async fn run_session(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    session: Interactive,
    first: Option<Frame>,
) -> Result<(), RelayError> {
    use futures::AsyncWriteExt as _;
    let (mut from_node, mut to_node) = tokio::io::split(io);
    let Interactive {
        mut output,
        mut stdin,
        control,
    } = session;
    let control: Arc<dyn SessionControl> = Arc::from(control);
    let input_control = control.clone();
    let input = tokio::spawn(async move {
        let mut first = first;
        loop {
            let frame = match first.take() {
                Some(frame) => frame,
                None => match read_frame(&mut from_node).await {
                    Ok(Some(frame)) => frame,
                    Ok(None) | Err(_) => break,
                },
            };
            match frame {
                Frame::Stdin(bytes) => {
                    if stdin.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Frame::StdinClosed => break,
                Frame::Resize { width, height } => {
                    if let Err(e) = input_control.resize(width, height).await {
                        tracing::debug!(error = %e, "terminal resize failed");
                    }
                }
                Frame::Stdout(_) | Frame::Stderr(_) | Frame::Exit(_) => {}
            }
        }
        let _ = stdin.close().await;
    });
    while let Some(chunk) = output.next().await {
        let frame = match chunk {
            Ok(Output::Stdout(bytes)) => Frame::Stdout(bytes),
            Ok(Output::Stderr(bytes)) => Frame::Stderr(bytes),
            Err(e) => {
                tracing::debug!(error = %e, "exec output broke off");
                break;
            }
        };
        write_frame(&mut to_node, &frame).await?;
    }
    input.abort();
    let exit = exit_of(control.as_ref()).await;
    write_frame(&mut to_node, &Frame::Exit(exit)).await?;
    to_node.shutdown().await?;
    Ok(())
}

/// The session's exit code, waiting briefly for Podman to record it after the
/// output closed.
async fn exit_of(control: &dyn SessionControl) -> Exit {
    for _ in 0..EXIT_CODE_ATTEMPTS {
        match control.exit_code().await {
            Ok(Some(code)) => return Exit::Code(code),
            Ok(None) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            Err(e) => return Exit::Error(e.to_string()),
        }
    }
    Exit::Error("the command's exit code is unknown".into())
}

/// 50 ms apart: up to 5 s.
const EXIT_CODE_ATTEMPTS: usize = 100;

fn label(labels: &std::collections::BTreeMap<String, String>, key: &str) -> String {
    labels.get(key).cloned().unwrap_or_default()
}

fn number(labels: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    labels
        .get(key)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

/// The newest copy of the pod on this agent, if `owner` owns it.
async fn owned_copy(
    runtime: &dyn Runtime,
    owner: PeerId,
    pod: &PodUid,
) -> Result<RuntimePod, KubeletAnswer> {
    let pods = runtime
        .list_pods(labels::POD_UID, &pod.0)
        .await
        .map_err(|e: RuntimeError| failed(500, e.to_string()))?;
    let newest = pods
        .into_iter()
        .max_by_key(|p| number(&p.labels, labels::EPOCH))
        .ok_or_else(|| failed(404, format!("pod {pod} is not on this agent")))?;
    if label(&newest.labels, labels::OWNER) != owner.to_string() {
        return Err(failed(403, format!("peer {owner} does not own pod {pod}")));
    }
    Ok(newest)
}

/// The pod's address for a connection of its owner: the supervisors' record, else (a
/// pod still starting) the runtime's.
async fn address(
    runtime: &dyn Runtime,
    addresses: &PodAddresses,
    owner: PeerId,
    pod: &PodUid,
) -> Result<std::net::IpAddr, KubeletAnswer> {
    match addresses.get(pod, &owner) {
        Some(ip) => Ok(ip),
        None => pod_ip(runtime, owner, pod).await,
    }
}

/// A socket of `connect`'s to the owner's pod at `port`, or the refusal to answer with
/// (`failed to <what> port …`).
pub(super) async fn reach_pod<T, F>(
    runtime: &dyn Runtime,
    addresses: &PodAddresses,
    owner: PeerId,
    pod: &PodUid,
    port: u16,
    what: &str,
    connect: impl FnOnce(std::net::SocketAddr) -> F,
) -> Result<T, KubeletAnswer>
where
    F: std::future::Future<Output = std::io::Result<T>>,
{
    let ip = address(runtime, addresses, owner, pod).await?;
    connect((ip, port).into()).await.map_err(|e| {
        failed(
            500,
            format!("failed to {what} port {port} of pod {pod}: {e}"),
        )
    })
}

/// A UDP socket of the agent's, connected to `to`.
async fn udp_socket_to(to: std::net::SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let any: std::net::IpAddr = match to {
        std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = tokio::net::UdpSocket::bind((any, 0)).await?;
    socket.connect(to).await?;
    Ok(socket)
}

/// The pod's IP (its network namespace), from the runtime, for its owner only.
async fn pod_ip(
    runtime: &dyn Runtime,
    owner: PeerId,
    pod: &PodUid,
) -> Result<std::net::IpAddr, KubeletAnswer> {
    let copy = owned_copy(runtime, owner, pod).await?;
    runtime
        .pod_ip(&copy.id)
        .await
        .map_err(|e| failed(500, e.to_string()))?
        .ok_or_else(|| failed(500, format!("pod {pod} has no IP address yet")))
}

fn failed(code: u16, message: String) -> KubeletAnswer {
    KubeletAnswer::Failed { code, message }
}

/// The Podman container for a pod's container: the newest instance of the newest copy,
/// or the one before it for `previous`. Refused unless `owner` owns the pod.
async fn find_container(
    runtime: &dyn Runtime,
    owner: PeerId,
    pod: &PodUid,
    container: &str,
    previous: bool,
) -> Result<String, KubeletAnswer> {
    let newest = owned_copy(runtime, owner, pod).await?;
    let pod_name = label(&newest.labels, labels::POD_NAME);
    let mut instances: Vec<&RuntimeContainer> = newest
        .containers
        .iter()
        .filter(|c| label(&c.labels, labels::CONTAINER) == container)
        .collect();
    instances.sort_by_key(|c| std::cmp::Reverse(number(&c.labels, labels::ATTEMPT)));
    let wanted = if previous {
        instances.get(1)
    } else {
        instances.first()
    };
    wanted.map(|c| c.id.clone()).ok_or_else(|| {
        // The kubelet's texts for these cases.
        let message = if previous {
            format!("previous terminated container \"{container}\" in pod \"{pod_name}\" not found")
        } else {
            format!("container \"{container}\" in pod \"{pod_name}\" is waiting to start: ContainerCreating")
        };
        failed(400, message)
    })
}
