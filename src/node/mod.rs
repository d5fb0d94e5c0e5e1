//! The virtual node: owns pods, offers them to the mesh and follows their status.
//!
//! Standalone, its pods come from a manifest directory and their status is printed.

pub mod manifests;
pub mod owner;
mod printer;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mesh::{MeshEvent, MeshHandle};
use crate::metrics::Metrics;
use crate::wire::GossipMessage;
use manifests::ManifestDir;
use owner::{Owner, OwnerConfig};
pub use printer::PhasePrinter;

/// How often the manifest directory is scanned when inotify says nothing (changes
/// must be noticed within 5 s even where inotify does not work, e.g. some network
/// filesystems).
const MANIFEST_SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Granularity of the owner's timers (offer windows, retries).
const OWNER_TICK: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot read manifest directory {path}")]
    ManifestDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub pod_manifest_path: PathBuf,
    pub owner: OwnerConfig,
}

pub struct Node {
    config: NodeConfig,
    mesh: MeshHandle,
    metrics: Metrics,
}

impl Node {
    pub fn new(config: NodeConfig, mesh: MeshHandle, metrics: Metrics) -> Node {
        Node {
            config,
            mesh,
            metrics,
        }
    }

    pub async fn run(
        self,
        mut events: mpsc::Receiver<MeshEvent>,
        cancel: CancellationToken,
    ) -> Result<(), NodeError> {
        let me = self.mesh.local_peer_id();
        let mut source = ManifestDir::new(self.config.pod_manifest_path.clone(), me.to_string());
        // Read once before anything else, so that a bad path fails at start.
        let first = source.scan().await.map_err(|e| NodeError::ManifestDir {
            path: self.config.pod_manifest_path.clone(),
            source: e,
        })?;
        let mut owner = Owner::new(
            self.config.owner.clone(),
            self.mesh.clone(),
            self.metrics.clone(),
            Box::new(PhasePrinter::default()),
        );
        let mut reported_errors = Vec::new();
        apply_scan(&mut owner, first, &mut reported_errors);

        let (changed_tx, mut changed) = mpsc::channel(1);
        // Kept alive for the loop's lifetime; None when inotify is unavailable.
        let _watcher = watch(&self.config.pod_manifest_path, changed_tx);
        let mut scan = tokio::time::interval(MANIFEST_SCAN_INTERVAL);
        scan.reset();
        let mut tick = tokio::time::interval(OWNER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(event) = events.recv() => match event {
                    MeshEvent::Gossip { source, message: GossipMessage::Heartbeat(hb) } => {
                        owner.on_heartbeat(source, hb);
                    }
                    MeshEvent::Gossip { message: GossipMessage::Offer(_), .. } => {}
                    MeshEvent::Request { peer, request, reply } => {
                        let _ = reply.send(owner.on_request(peer, request));
                    }
                    MeshEvent::PeerConnected(_) | MeshEvent::PeerDisconnected(_) => {}
                },
                Some(()) = owner.next_internal() => {}
                _ = tick.tick() => owner.tick(),
                _ = scan.tick() => rescan(&mut source, &mut owner, &mut reported_errors).await,
                Some(()) = changed.recv() => rescan(&mut source, &mut owner, &mut reported_errors).await,
            }
        }
        Ok(())
    }
}

/// Watches the manifest directory with inotify; every event wakes the node loop for a
/// scan (a full channel already holds a wake-up, so events coalesce).
fn watch(dir: &std::path::Path, changed: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::event::{AccessKind, AccessMode, EventKind};
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes: reads (including our own scans) must not wake us.
        let is_change = event.is_ok_and(|e| {
            matches!(
                e.kind,
                EventKind::Create(_)
                    | EventKind::Modify(_)
                    | EventKind::Remove(_)
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
            )
        });
        if is_change {
            let _ = changed.try_send(());
        }
    })
    .map_err(|e| tracing::warn!(error = %e, "inotify unavailable; polling the manifest directory"))
    .ok()?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| tracing::warn!(error = %e, "cannot watch the manifest directory; polling it"))
        .ok()?;
    Some(watcher)
}

async fn rescan(
    source: &mut ManifestDir,
    owner: &mut Owner,
    reported: &mut Vec<manifests::ManifestError>,
) {
    match source.scan().await {
        Ok(result) => apply_scan(owner, result, reported),
        Err(e) => {
            tracing::warn!(dir = %source.dir().display(), error = %e, "cannot scan manifest directory")
        }
    }
}

/// Hands the scan's pods to the owner and reports each new manifest error once.
fn apply_scan(
    owner: &mut Owner,
    scan: manifests::Scan,
    reported: &mut Vec<manifests::ManifestError>,
) {
    for error in &scan.errors {
        if !reported.contains(error) {
            tracing::error!("manifest {error}");
            println!("{} manifest error: {error}", printer::timestamp());
        }
    }
    *reported = scan.errors;
    owner.set_desired(scan.pods);
}
