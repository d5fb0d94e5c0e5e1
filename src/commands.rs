//! Runs each role from its parsed command line. The program's edge: errors are
//! `anyhow`, with context a person can act on.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentConfig};
use crate::cli::{self, AgentArgs, Command, IdArgs, MeshArgs, NodeArgs, OutputFormat, StatusArgs};
use crate::mesh::{self, MeshConfig, MeshEvent};
use crate::metrics::Metrics;
use crate::node::owner::OwnerConfig;
use crate::node::{Node, NodeConfig};
use crate::runtime::podman::Podman;
use crate::runtime::Runtime;
use crate::trust::{load_or_create_identity, OwnerPolicy};
use crate::wire::{MeshView, Request, Resources, Response, Topic};

pub async fn run(command: Command) -> Result<()> {
    match command {
        Command::Id(args) => id(args),
        Command::Agent(args) => agent(args).await,
        Command::Node(args) => node(args).await,
        Command::Status(args) => status(args).await,
    }
}

fn id(args: IdArgs) -> Result<()> {
    let keypair = load_or_create_identity(&args.state_dir)?;
    println!("{}", keypair.public().to_peer_id());
    Ok(())
}

/// Cancelled on SIGINT or SIGTERM.
fn shutdown_token() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        cancel.cancel();
    });
    Ok(token)
}

/// Joins the mesh as described by the flags; returns the handle, the event stream
/// and the running event loop.
fn join_mesh(
    args: &MeshArgs,
    subscribe: Vec<Topic>,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> Result<(
    mesh::MeshHandle,
    tokio::sync::mpsc::Receiver<MeshEvent>,
    JoinHandle<()>,
)> {
    let keypair = load_or_create_identity(&args.state_dir)?;
    let config = MeshConfig {
        listen: args.listen.clone(),
        bootstrap: args.bootstrap.clone(),
        subscribe,
        ..MeshConfig::default()
    };
    let (handle, events, event_loop) = mesh::start(keypair, config, metrics.clone())?;
    let task = tokio::spawn(event_loop.run(cancel.clone()));
    if let Some(addr) = args.metrics_addr {
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics.serve(addr, cancel).await {
                tracing::error!(%addr, error = %e, "cannot serve metrics");
            }
        });
    }
    Ok((handle, events, task))
}

fn default_host_ip(listen: &[Multiaddr]) -> Option<IpAddr> {
    listen.iter().find_map(|addr| {
        addr.iter().find_map(|p| match p {
            Protocol::Ip4(ip) if !ip.is_unspecified() => Some(IpAddr::V4(ip)),
            _ => None,
        })
    })
}

fn machine_capacity() -> (u64, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    (cpus * 1000, system.total_memory())
}

async fn agent(args: AgentArgs) -> Result<()> {
    let runtime = Podman::new(&args.podman_socket)
        .with_context(|| format!("invalid --podman-socket {}", args.podman_socket))?;
    // Checked before joining the mesh: an agent without a runtime must not bid.
    runtime.ping().await.with_context(|| {
        format!(
            "cannot reach Podman at {}: start its REST service (bash hack/install-podman.sh, \
             or podman system service --time=0 <socket>) or pass --podman-socket",
            args.podman_socket
        )
    })?;
    let (machine_cpu, machine_memory) = machine_capacity();
    let capacity = Resources {
        cpu_millis: args.cpu.unwrap_or(machine_cpu),
        memory_bytes: args.memory.unwrap_or(machine_memory),
        pods: args.max_pods,
    };
    let cancel = shutdown_token()?;
    let metrics = Metrics::new();
    let (mesh, events, mesh_task) = join_mesh(&args.mesh, Topic::ALL.to_vec(), &metrics, &cancel)?;
    let policy = OwnerPolicy::new(args.trust.iter().copied());
    let config = AgentConfig {
        state_dir: args.mesh.state_dir.clone(),
        labels: cli::labels_map(&args.labels),
        capacity,
        score_mode: args.score_mode,
        heartbeat_interval: Duration::from_secs(args.heartbeat_seconds),
        resync_interval: Duration::from_secs(10),
        host_ip: args.host_ip.or_else(|| default_host_ip(&args.mesh.listen)),
    };
    tracing::info!(peer = %mesh.local_peer_id(), cpu_millis = capacity.cpu_millis, memory_bytes = capacity.memory_bytes, pods = capacity.pods, "agent starting");
    let agent = Agent::new(config, mesh, Arc::new(runtime), policy, metrics)?;
    let result = agent
        .run(events, cancel.clone())
        .await
        .context("agent stopped");
    cancel.cancel();
    let _ = mesh_task.await;
    result
}

async fn node(args: NodeArgs) -> Result<()> {
    if !args.pod_manifest_path.is_dir() {
        bail!(
            "--pod-manifest-path {} is not a directory",
            args.pod_manifest_path.display()
        );
    }
    let cancel = shutdown_token()?;
    let metrics = Metrics::new();
    let (mesh, events, mesh_task) =
        join_mesh(&args.mesh, vec![Topic::Heartbeats], &metrics, &cancel)?;
    let peer = mesh.local_peer_id();
    println!(
        "node {peer} owns the pods in {}",
        args.pod_manifest_path.display()
    );
    let config = NodeConfig {
        pod_manifest_path: args.pod_manifest_path,
        owner: OwnerConfig {
            offer_window: Duration::from_millis(args.offer_window_ms),
            agent_loss_timeout: Duration::from_secs(args.agent_loss_seconds),
            ..OwnerConfig::default()
        },
    };
    let result = Node::new(config, mesh, metrics)
        .run(events, cancel.clone())
        .await
        .context("node stopped");
    cancel.cancel();
    let _ = mesh_task.await;
    result
}

async fn status(args: StatusArgs) -> Result<()> {
    let cancel = CancellationToken::new();
    // A throwaway identity: `status` only asks.
    let keypair = libp2p::identity::Keypair::generate_ed25519();
    let config = MeshConfig {
        bootstrap: args.bootstrap.clone(),
        ..MeshConfig::default()
    };
    let (mesh, mut events, event_loop) = mesh::start(keypair, config, Metrics::new())?;
    let task = tokio::spawn(event_loop.run(cancel.clone()));
    let timeout = Duration::from_secs(args.timeout_seconds);
    let view = tokio::time::timeout(timeout, async {
        loop {
            match events.recv().await {
                Some(MeshEvent::PeerConnected(peer)) => {
                    match mesh.request(peer, Request::Query).await {
                        Ok(Response::View(view)) => return Ok(*view),
                        Ok(other) => bail!("{peer} answered {other:?}"),
                        Err(e) => tracing::debug!(%peer, error = %e, "query failed"),
                    }
                }
                Some(_) => {}
                None => bail!("the mesh stopped"),
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "no answer from {} within {}s",
            args.bootstrap
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            args.timeout_seconds
        )
    })??;
    cancel.cancel();
    let _ = task.await;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&view)?),
        OutputFormat::Table => print!("{}", render_table(&view)),
    }
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// The mesh view as two aligned tables.
pub fn render_table(view: &MeshView) -> String {
    let mut rows = vec![vec![
        "AGENT".to_string(),
        "CPU FREE/TOTAL".into(),
        "MEMORY FREE/TOTAL".into(),
        "PODS".into(),
        "LABELS".into(),
    ]];
    for a in &view.agents {
        rows.push(vec![
            a.peer.to_string(),
            format!("{}m/{}m", a.free.cpu_millis, a.capacity.cpu_millis),
            format!(
                "{}/{}",
                human_bytes(a.free.memory_bytes),
                human_bytes(a.capacity.memory_bytes)
            ),
            format!("{}/{}", a.pods, a.capacity.pods),
            a.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ]);
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut rows = vec![vec![
        "POD".to_string(),
        "PHASE".into(),
        "AGENT".into(),
        "EPOCH".into(),
        "REASON".into(),
    ]];
    for p in &view.pods {
        rows.push(vec![
            p.pod.to_string(),
            p.phase.clone(),
            p.agent
                .map(|a| a.to_string())
                .unwrap_or_else(|| "<none>".into()),
            p.epoch.to_string(),
            match (&p.reason, &p.message) {
                (Some(r), Some(m)) => format!("{r}: {m}"),
                (Some(r), None) => r.clone(),
                _ => String::new(),
            },
        ]);
    }
    out.push_str(&table(&rows));
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AgentSummary, Epoch, PeerRef, PodRef, PodSummary, PodUid};
    use libp2p::PeerId;

    #[test]
    fn status_tables_align_and_show_reasons() {
        let agent = PeerId::random();
        let view = MeshView {
            agents: vec![AgentSummary {
                peer: PeerRef(agent),
                labels: [("zone".to_string(), "a".to_string())].into(),
                capacity: Resources {
                    cpu_millis: 2000,
                    memory_bytes: 4 << 30,
                    pods: 110,
                },
                free: Resources {
                    cpu_millis: 1500,
                    memory_bytes: 3 << 30,
                    pods: 109,
                },
                pods: 1,
                last_seen_secs: 1,
            }],
            pods: vec![PodSummary {
                pod: PodRef {
                    uid: PodUid("u".into()),
                    namespace: "default".into(),
                    name: "big".into(),
                },
                agent: None,
                epoch: Epoch(0),
                phase: "Pending".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/1 agents fit: 1 insufficient memory".into()),
            }],
        };
        let text = render_table(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("AGENT"));
        assert!(lines[1].contains("1500m/2000m") && lines[1].contains("3.0Gi/4.0Gi"));
        assert!(lines[1].contains("1/110") && lines[1].ends_with("zone=a"));
        let pod_line = lines
            .iter()
            .find(|l| l.starts_with("default/big"))
            .expect("pod row");
        assert!(pod_line.contains("<none>"));
        assert!(pod_line.ends_with("Unschedulable: 0/1 agents fit: 1 insufficient memory"));
        // Columns line up: the PHASE header sits where the phase does.
        let header = lines
            .iter()
            .find(|l| l.starts_with("POD"))
            .expect("pod header");
        assert_eq!(header.find("PHASE"), pod_line.find("Pending"));
    }
}
