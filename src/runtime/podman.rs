//! [`Runtime`] over Podman's REST API, through the `podman-api` crate.
//!
//! Traps of Podman 4.3 worked around here: a stop's timeout is ignored (so stopping
//! is SIGTERM, a wait of our own, then SIGKILL); stopping a pod with an exited
//! container does nothing (so pods are removed with force); containers run with an
//! init process so that SIGTERM reaches programs that do not handle it as PID 1.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use podman_api::models::{ContainerMount, LinuxResources, NamedVolume, PortMapping as PodmanPort};
use podman_api::opts::{
    ContainerAttachOpts, ContainerCreateOpts, ContainerDeleteOpts, ContainerListFilter,
    ContainerListOpts, ContainerLogsOpts, ContainerStatsOpts, EventsOpts, ExecCreateOpts,
    ExecStartOpts, NetworkCreateOpts, PodCreateOpts, PodListFilter, PodListOpts, PullOpts,
    RegistryAuth, VolumeCreateOpts, VolumeListFilter, VolumeListOpts,
};
use podman_api::Podman as Client;

use super::{
    bridge, image_ref, labels, ContainerEvent, ContainerPlan, ContainerState, ContainerStatus,
    ExecOutput, Interactive, LogOptions, LogStream, MemoryVolume, Output, PodAddress, PodNetwork,
    PodPlan, Protocol, PullPolicy, Runtime, RuntimeContainer, RuntimeError, RuntimePod,
    SessionControl, Streams, TerminalSize, Usage,
};
use crate::wire::RegistryCredential;

/// A Podman stream pair as a session: output by stream, stdin, and its control.
fn interactive(
    multiplexer: podman_api::conn::Multiplexer,
    control: Box<dyn SessionControl>,
) -> Interactive {
    let (output, stdin) = multiplexer.split();
    let output = output.filter_map(|chunk| async move {
        match chunk {
            Ok(podman_api::conn::TtyChunk::StdOut(bytes)) => Some(Ok(Output::Stdout(bytes))),
            Ok(podman_api::conn::TtyChunk::StdErr(bytes)) => Some(Ok(Output::Stderr(bytes))),
            Ok(podman_api::conn::TtyChunk::StdIn(_)) => None,
            Err(e) => Some(Err(RuntimeError::Unavailable(e.to_string()))),
        }
    });
    Interactive {
        output: Box::pin(output),
        stdin: Box::pin(stdin),
        control,
    }
}

/// Resize and exit code of an attached container: its own process's.
struct PodmanAttach(podman_api::api::Container);

#[async_trait]
impl SessionControl for PodmanAttach {
    async fn resize(&self, width: u16, height: u16) -> Result<(), RuntimeError> {
        self.0
            .resize(usize::from(width), usize::from(height))
            .await
            .map_err(classify)
    }

    async fn exit_code(&self) -> Result<Option<i32>, RuntimeError> {
        let info = self.0.inspect().await.map_err(classify)?;
        let Some(state) = info.state else {
            return Ok(None);
        };
        if state.running == Some(true) {
            return Ok(None);
        }
        Ok(state.exit_code)
    }
}

/// Resize and exit code of a Podman exec session.
struct PodmanExec(podman_api::api::Exec);

#[async_trait]
impl SessionControl for PodmanExec {
    async fn resize(&self, width: u16, height: u16) -> Result<(), RuntimeError> {
        self.0
            .resize(usize::from(width), usize::from(height))
            .await
            .map_err(classify)
    }

    async fn exit_code(&self) -> Result<Option<i32>, RuntimeError> {
        let info = self.0.inspect().await.map_err(classify)?;
        if info.get("Running").and_then(|r| r.as_bool()) == Some(true) {
            return Ok(None);
        }
        Ok(info
            .get("ExitCode")
            .and_then(|c| c.as_i64())
            .and_then(|c| i32::try_from(c).ok()))
    }
}

/// Drops the first `*skip` lines from a run of chunks (counting down across calls).
fn skip_lines_of(mut chunk: Vec<u8>, skip: &mut u64) -> Vec<u8> {
    while *skip > 0 {
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                chunk.drain(..=end);
                *skip -= 1;
            }
            None => return Vec::new(),
        }
    }
    chunk
}

/// Causes Podman 4.3 reports with status 500 although the request is at fault.
const REQUEST_ERROR_CAUSES: &[&str] = &[
    "invalid argument",
    "invalid reference format",
    "image not known",
    "that name is already in use",
    "address already in use",
    "container state improper",
    "no such file or directory",
    "no matching entries in passwd file",
    "OCI runtime attempted to invoke a command that was not found",
    "OCI permission denied",
];
/// Causes meaning "does not exist", which Podman 4.3 sometimes reports with status 500.
const NOT_FOUND_CAUSES: &[&str] = &["no such pod", "no such container", "no such exec session"];
/// Podman inspects a running container by reading its process's files in `/proc`; one
/// that exits meanwhile fails the inspection with this cause, and the next one sees it
/// exited.
const EXITED_WHILE_INSPECTED: &str = "no such process";
/// Inspections of one container, when its process keeps exiting under them.
const INSPECT_ATTEMPTS: u32 = 3;
/// At most this much of an exec's output is kept: probes need little, and a chatty
/// command must not grow the agent's memory. The rest is read and dropped.
const MAX_EXEC_OUTPUT: usize = 64 * 1024;
/// Log chunks read ahead of a slow reader.
const LOG_CHUNKS_IN_FLIGHT: usize = 16;

/// Refuses, before any request, a name podman-api would choke on in a URL path.
fn path_safe(what: &str, name: &str) -> Result<(), RuntimeError> {
    if super::is_reference_text(name) {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "invalid {what} {name:?}: only letters, digits and . _ - / : @ are allowed"
        )))
    }
}

/// CFS period for cpu limits, as the kubelet uses.
const CPU_PERIOD_MICROS: u64 = 100_000;
/// How often a stopping container is checked.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The Podman REST API client.
pub struct Podman {
    client: Client,
    /// The bridge interface of each pod network as last found, by network name (one
    /// per owner this agent runs pods for): the pin after a pod's start needs no
    /// second inspection.
    bridges: std::sync::Mutex<HashMap<String, String>>,
}

/// Container events buffered between Podman's stream and the agent.
const EVENT_BUFFER: usize = 1024;

/// The actions after which a container's state is worth a look (not exec, attach or
/// health-check events, which a probe causes every period).
const STATE_ACTIONS: [&str; 6] = ["start", "died", "oom", "pause", "unpause", "remove"];

/// A Podman event as the supervisors need it: which pod's container changed state.
fn container_event(event: &podman_api::models::Event) -> Option<ContainerEvent> {
    if !STATE_ACTIONS.contains(&event.action.as_str()) {
        return None;
    }
    let attributes = &event.actor.attributes;
    Some(ContainerEvent {
        pod: crate::wire::PodUid(attributes.get(labels::POD_UID)?.clone()),
        epoch: crate::wire::Epoch(attributes.get(labels::EPOCH)?.parse().ok()?),
    })
}

/// Where the infra container holds a pod's memory volumes mounted (containers of the
/// pod inherit the infra container's volumes: a hidden directory, then).
const MEMORY_VOLUME_HOLD: &str = "/.beemesh-memory-volumes";
/// tmpfs counts its size in pages.
const TMPFS_PAGE: u64 = 4096;

impl Podman {
    /// A tmpfs volume of the local driver. Its size goes as `nr_blocks`: Podman 4 takes
    /// `size=` for a disk quota and refuses it where quotas are not set up.
    async fn create_memory_volume(
        &self,
        plan: &PodPlan,
        memory: &MemoryVolume,
    ) -> Result<(), RuntimeError> {
        path_safe("volume", &memory.volume)?;
        if self
            .client
            .volumes()
            .get(&memory.volume)
            .exists()
            .await
            .map_err(classify)?
        {
            // Left by a sandbox that did not start: it is this copy's, and empty.
            return Ok(());
        }
        // World-writable as every emptyDir, or the fsGroup's with setgid: set by the mount,
        // since the agent may not write where Podman keeps volumes.
        let mut mount_options = vec!["nodev".to_string(), "nosuid".to_string()];
        match memory.group {
            Some(gid) => mount_options.extend(["mode=2777".to_string(), format!("gid={gid}")]),
            None => mount_options.push("mode=0777".to_string()),
        }
        if let Some(bytes) = memory.size_bytes {
            mount_options.push(format!("nr_blocks={}", bytes.div_ceil(TMPFS_PAGE).max(1)));
        }
        let mut labels = plan.labels.clone();
        labels.insert(labels::PODMAN_POD.to_owned(), plan.name.clone());
        let opts = VolumeCreateOpts::builder()
            .name(&memory.volume)
            .driver("local")
            .labels(labels)
            .options([
                ("type", "tmpfs".to_string()),
                ("device", "tmpfs".to_string()),
                ("o", mount_options.join(",")),
            ])
            .build();
        self.client
            .volumes()
            .create(&opts)
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// The pod network, made unless it exists (another agent on this Podman may have
    /// made it, even at the same moment). Without Podman's DNS: pods resolve as their
    /// spec says, and the subnet's gateway address stays free for the agent. Looked at
    /// for every pod: one removed behind the agent's back (`podman network prune`
    /// removes those no container uses) is made again; a failed pod create would leave
    /// its pod behind in Podman's state, its name taken.
    async fn ensure_network(&self, network: &PodNetwork) -> Result<(), RuntimeError> {
        path_safe("network", &network.name)?;
        let existing = || async {
            match self.client.networks().get(&network.name).inspect().await {
                Ok(found) => Ok(Some(found)),
                Err(e) => match classify(e) {
                    RuntimeError::NotFound(_) => Ok(None),
                    other => Err(other),
                },
            }
        };
        let found = match existing().await? {
            Some(found) => found,
            None => {
                let opts = NetworkCreateOpts::builder()
                    .name(&network.name)
                    .driver("bridge")
                    .dns_enabled(false)
                    .labels([(labels::NETWORK.to_owned(), "true".to_owned())])
                    .subnets([podman_api::models::Subnet {
                        subnet: Some(network.subnet.to_string()),
                        gateway: Some(network.gateway.to_string()),
                        lease_range: None,
                    }])
                    .build();
                match self.client.networks().create(&opts).await {
                    Ok(created) => created,
                    Err(e) => {
                        let error = classify(e);
                        existing().await?.ok_or(error)?
                    }
                }
            }
        };
        let subnets: Vec<String> = found
            .subnets
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| s.subnet)
            .collect();
        if !subnets.iter().any(|s| *s == network.subnet.to_string()) {
            return Err(RuntimeError::Invalid(format!(
                "Podman network {} exists with subnets [{}], not {}",
                network.name,
                subnets.join(", "),
                network.subnet
            )));
        }
        let interface = found.network_interface.unwrap_or_default();
        self.bridges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(network.name.clone(), interface);
        Ok(())
    }

    /// The bridge of the network as [`Podman::ensure_network`] last found it.
    fn bridge_of(&self, network: &PodNetwork) -> Option<String> {
        self.bridges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&network.name)
            .cloned()
    }

    /// Fixes the MAC address of the network's bridge, which exists once a pod on it has
    /// started; each start checks again, as the bridge goes with the network's last
    /// pod and comes back with the next. A failure leaves the pods running, with the
    /// loss [`super::bridge`] describes whenever the address moves, so it is a warning.
    async fn pin_bridge_address(&self, network: &PodNetwork) {
        let pinned = async {
            let interface = match self.bridge_of(network) {
                Some(known) => known,
                None => {
                    let found = self.client.networks().get(&network.name).inspect().await;
                    found
                        .map_err(|e| classify(e).to_string())?
                        .network_interface
                        .unwrap_or_default()
                }
            };
            let pinning = interface.clone();
            let address = tokio::task::spawn_blocking(move || bridge::pin_address(&pinning))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(address.map(|address| (interface, address)))
        };
        match pinned.await {
            Ok(None) => {}
            Ok(Some((interface, address))) => {
                tracing::info!(network = %network.name, %interface, %address, "fixed the pod network bridge's MAC address");
            }
            Err(error) => {
                tracing::warn!(network = %network.name, %error, "cannot fix the pod network bridge's MAC address");
            }
        }
    }

    /// Removes the memory volumes of a removed pod.
    async fn remove_memory_volumes(&self, pod_name: &str) -> Result<(), RuntimeError> {
        let opts = VolumeListOpts::builder()
            .filter([VolumeListFilter::LabelKeyVal(
                labels::PODMAN_POD.to_owned(),
                pod_name.to_owned(),
            )])
            .build();
        for volume in self.client.volumes().list(&opts).await.map_err(classify)? {
            match self.client.volumes().get(&volume.name).remove().await {
                Ok(()) => {}
                Err(e) => match classify(e) {
                    RuntimeError::NotFound(_) => {}
                    other => return Err(other),
                },
            }
        }
        Ok(())
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.client
            .images()
            .get(image)
            .exists()
            .await
            .map_err(classify)
    }

    /// One pull of `image`, with `auth` in its request's X-Registry-Auth header only
    /// (Podman keeps no auth file for a single login); the error as Podman reports it.
    async fn pull(&self, image: &str, auth: Option<RegistryAuth>) -> Result<(), String> {
        let mut builder = PullOpts::builder().reference(image).quiet(true);
        if let Some(auth) = auth {
            builder.auth(auth);
        }
        let opts = builder.build();
        let images = self.client.images();
        let mut reports = images.pull(&opts);
        let mut failure = None;
        while let Some(report) = reports.next().await {
            match report {
                Ok(r) => {
                    if let Some(e) = r.error.filter(|e| !e.is_empty()) {
                        failure = Some(e);
                    }
                }
                Err(e) => failure = Some(classify(e).to_string()),
            }
        }
        match failure {
            Some(e) => Err(e),
            None if self.image_present(image).await.unwrap_or(false) => Ok(()),
            None => Err("the image is not present after the pull".into()),
        }
    }

    /// `unix:///run/podman/podman.sock`, or `tcp://host:port`.
    pub fn new(uri: &str) -> Result<Podman, RuntimeError> {
        if !(uri.starts_with("unix://") || uri.starts_with("tcp://") || uri.starts_with("http://"))
        {
            return Err(RuntimeError::Invalid(format!(
                "unsupported Podman socket {uri:?}: expected unix:///path or tcp://host:port"
            )));
        }
        let client = Client::new(uri)
            .map_err(|e| RuntimeError::Invalid(format!("invalid Podman socket {uri:?}: {e}")))?;
        Ok(Podman {
            client,
            bridges: Default::default(),
        })
    }
}

/// Podman's answer, classified: 404 is NotFound, other 4xx are Invalid (with Podman's
/// message, which users see as a status message), everything else Unavailable.
fn classify(e: podman_api::Error) -> RuntimeError {
    let fault = match &e {
        podman_api::Error::Fault { code, message } => Some((code.as_u16(), message.clone())),
        podman_api::Error::Error(podman_api::conn::Error::Fault { code, message }) => {
            Some((code.as_u16(), message.clone()))
        }
        _ => None,
    };
    let Some((code, body)) = fault else {
        return RuntimeError::Unavailable(e.to_string());
    };
    let message = podman_message(&body);
    let caused_by = |causes: &[&str]| causes.iter().any(|c| message.contains(c));
    match code {
        404 => RuntimeError::NotFound(message),
        400..=499 => RuntimeError::Invalid(message),
        // Podman 4.3 answers 500 for many faults of the request; its cause tells.
        _ if caused_by(NOT_FOUND_CAUSES) => RuntimeError::NotFound(message),
        _ if caused_by(REQUEST_ERROR_CAUSES) => RuntimeError::Invalid(message),
        _ => RuntimeError::Unavailable(format!("{code}: {message}")),
    }
}

/// Whether an inspection failed only because the container's process exited during it.
fn exited_while_inspected(message: &str) -> bool {
    message.contains(EXITED_WHILE_INSPECTED)
}

/// Podman's error bodies are JSON with a `message`; show just that.
fn podman_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.trim().to_string())
}

/// Podman reports never-set times as year 1; those are no times at all.
fn timestamp(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<Timestamp> {
    let t = t?;
    let secs = t.timestamp();
    if secs <= 0 {
        return None;
    }
    Timestamp::new(secs, i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0)).ok()
}

fn to_map(labels: Option<HashMap<String, String>>) -> BTreeMap<String, String> {
    labels.unwrap_or_default().into_iter().collect()
}

fn status_of(state: Option<&str>) -> ContainerStatus {
    match state {
        Some("created") | Some("configured") | Some("initialized") => ContainerStatus::Created,
        Some("running") => ContainerStatus::Running,
        Some("exited") | Some("stopped") => ContainerStatus::Exited,
        Some("paused") => ContainerStatus::Paused,
        _ => ContainerStatus::Other,
    }
}

/// Memory and cpu limits. The models have no `Default`, so they are built from the
/// JSON the API takes.
fn resource_limits(plan: &ContainerPlan) -> Result<LinuxResources, RuntimeError> {
    let mut limits = serde_json::Map::new();
    if let Some(bytes) = plan.memory_limit_bytes {
        // Swap equal to the limit: no swap on top of it, as with the kubelet.
        limits.insert(
            "memory".into(),
            serde_json::json!({ "limit": bytes, "swap": bytes }),
        );
    }
    if let Some(millis) = plan.cpu_limit_millis {
        // The kernel refuses quotas under 1 ms.
        let quota = (millis.saturating_mul(CPU_PERIOD_MICROS) / 1000).max(1000);
        limits.insert(
            "cpu".into(),
            serde_json::json!({ "period": CPU_PERIOD_MICROS, "quota": quota }),
        );
    }
    serde_json::from_value(serde_json::Value::Object(limits))
        .map_err(|e| RuntimeError::Invalid(format!("invalid resource limits: {e}")))
}

fn bind_mount(source: &std::path::Path, destination: &str, read_only: bool) -> ContainerMount {
    ContainerMount {
        destination: Some(destination.to_owned()),
        source: Some(source.display().to_string()),
        _type: Some("bind".into()),
        options: Some(vec![
            "rbind".into(),
            if read_only { "ro" } else { "rw" }.into(),
        ]),
        uid_mappings: None,
        gid_mappings: None,
    }
}

fn port_mapping(p: &super::PortMapping) -> PodmanPort {
    PodmanPort {
        container_port: Some(p.container_port),
        host_port: Some(p.host_port),
        host_ip: p.host_ip.clone(),
        protocol: Some(
            match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
            .to_string(),
        ),
        range: None,
    }
}

impl Podman {
    async fn inspect_state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        path_safe("container", id)?;
        let container = self.client.containers().get(id);
        let mut attempts = 1;
        let info = loop {
            match container.inspect().await.map_err(classify) {
                Err(RuntimeError::Unavailable(message))
                    if exited_while_inspected(&message) && attempts < INSPECT_ATTEMPTS =>
                {
                    attempts += 1;
                }
                answer => break answer?,
            }
        };
        let Some(state) = info.state else {
            return Err(RuntimeError::Unavailable(format!(
                "Podman reported no state for container {id}"
            )));
        };
        let image_ref = info.image.as_deref().map(|id| {
            image_ref::image_id(
                info.image_name.as_deref().unwrap_or_default(),
                info.image_digest.as_deref(),
                id,
            )
        });
        // Podman measures the writable layer with every inspection (podman-api asks
        // for sizes); the log is a file of the agent's host.
        let log_path = info
            .host_config
            .as_ref()
            .and_then(|h| h.log_config.as_ref())
            .and_then(|l| l.path.as_deref());
        let log_bytes = match log_path.filter(|p| !p.is_empty()) {
            Some(path) => tokio::fs::metadata(path).await.map_or(0, |m| m.len()),
            None => 0,
        };
        let disk_bytes = info
            .size_rw
            .map(|rw| u64::try_from(rw).unwrap_or(0).saturating_add(log_bytes));
        Ok(ContainerState {
            status: status_of(state.status.as_deref()),
            exit_code: state.exit_code,
            started_at: timestamp(state.started_at),
            finished_at: timestamp(state.finished_at),
            error: state.error.filter(|e| !e.is_empty()),
            image_ref,
            disk_bytes,
        })
    }
}

#[async_trait]
impl Runtime for Podman {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.client.ping().await.map(|_| ()).map_err(classify)
    }

    async fn list_pods(
        &self,
        label_key: &str,
        label_value: &str,
    ) -> Result<Vec<RuntimePod>, RuntimeError> {
        let pods = self
            .client
            .pods()
            .list(
                &PodListOpts::builder()
                    .filter([PodListFilter::LabelKeyVal(
                        label_key.to_string(),
                        label_value.to_string(),
                    )])
                    .build(),
            )
            .await
            .map_err(classify)?;
        // One more call for all their containers: same label, any state.
        let containers = self
            .client
            .containers()
            .list(
                &ContainerListOpts::builder()
                    .all(true)
                    .filter([ContainerListFilter::LabelKeyVal(
                        label_key.to_string(),
                        label_value.to_string(),
                    )])
                    .build(),
            )
            .await
            .map_err(classify)?;
        let mut out: Vec<RuntimePod> = pods
            .into_iter()
            .filter_map(|p| {
                Some(RuntimePod {
                    id: p.id?,
                    name: p.name.unwrap_or_default(),
                    labels: to_map(p.labels),
                    containers: Vec::new(),
                })
            })
            .collect();
        for c in containers {
            if c.is_infra == Some(true) {
                continue;
            }
            let (Some(id), Some(pod_id)) = (c.id, c.pod) else {
                continue;
            };
            let Some(pod) = out.iter_mut().find(|p| p.id == pod_id) else {
                continue;
            };
            let exited_at = c.exited_at.filter(|t| *t > 0);
            pod.containers.push(RuntimeContainer {
                id,
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default(),
                labels: to_map(c.labels),
                state: ContainerState {
                    status: status_of(c.state.as_deref()),
                    exit_code: c.exit_code,
                    started_at: c
                        .started_at
                        .filter(|t| *t > 0)
                        .and_then(|t| Timestamp::from_second(t).ok()),
                    finished_at: exited_at.and_then(|t| Timestamp::from_second(t).ok()),
                    error: None,
                    image_ref: None,
                    disk_bytes: None,
                },
            });
        }
        Ok(out)
    }

    async fn create_pod(&self, plan: &PodPlan) -> Result<String, RuntimeError> {
        for memory in &plan.memory_volumes {
            self.create_memory_volume(plan, memory).await?;
        }
        if let Some(network) = &plan.network {
            self.ensure_network(network).await?;
        }
        let mut opts = PodCreateOpts::builder()
            .name(&plan.name)
            .hostname(&plan.hostname)
            .labels(plan.labels.clone())
            .portmappings(plan.ports.iter().map(port_mapping))
            // Mounted in the infra container, the tmpfs lives as long as the sandbox
            // (Podman would unmount it, emptied, whenever no container used it).
            .volumes(plan.memory_volumes.iter().map(|memory| NamedVolume {
                name: Some(memory.volume.clone()),
                dest: Some(format!("{MEMORY_VOLUME_HOLD}/{}", memory.name)),
                options: Some(vec!["rw".into()]),
                is_anonymous: None,
            }))
            .add_hosts(
                plan.host_aliases
                    .iter()
                    .map(|(hostname, ip)| format!("{hostname}:{ip}")),
            );
        if let Some(resolv) = &plan.dns {
            // An empty list would make Podman use the host's entries; "." is its word
            // for no search path, and ndots:1 the resolver's default, for no options.
            let searches = match resolv.searches.as_slice() {
                [] => vec![".".to_owned()],
                some => some.to_vec(),
            };
            let options = match resolv.options.as_slice() {
                [] => vec!["ndots:1".to_owned()],
                some => some.to_vec(),
            };
            opts = opts
                .dns_server(resolv.nameservers.clone())
                .dns_search(searches)
                .dns_option(options);
        }
        if let Some(network) = &plan.network {
            // "Networks" in Podman 4 and later; podman-api sends only the older name,
            // which Podman 4 and 5 still read.
            opts = opts.cni_networks([network.name.clone()]);
        }
        let opts = opts.build();
        let pod = self.client.pods().create(&opts).await.map_err(classify)?;
        Ok(pod.id().to_string())
    }

    async fn start_pod(
        &self,
        pod_id: &str,
        network: Option<&PodNetwork>,
    ) -> Result<(), RuntimeError> {
        path_safe("pod", pod_id)?;
        self.client
            .pods()
            .get(pod_id)
            .start()
            .await
            .map_err(classify)?;
        if let Some(network) = network {
            self.pin_bridge_address(network).await;
        }
        Ok(())
    }

    async fn pod_address(&self, pod_id: &str) -> Result<Option<PodAddress>, RuntimeError> {
        path_safe("pod", pod_id)?;
        let pod = self
            .client
            .pods()
            .get(pod_id)
            .inspect()
            .await
            .map_err(classify)?;
        let Some(infra) = pod.infra_container_id else {
            return Ok(None);
        };
        let info = self
            .client
            .containers()
            .get(infra)
            .inspect()
            .await
            .map_err(classify)?;
        let Some(settings) = info.network_settings else {
            return Ok(None);
        };
        let addresses = std::iter::once((settings.ip_address, settings.mac_address)).chain(
            settings
                .networks
                .unwrap_or_default()
                .into_values()
                .map(|n| (n.ip_address, n.mac_address)),
        );
        Ok(addresses.into_iter().find_map(|(ip, mac)| {
            Some(PodAddress {
                ip: ip?.parse::<IpAddr>().ok()?,
                mac: mac.and_then(|m| m.parse().ok()),
            })
        }))
    }

    async fn image_user(&self, image: &str) -> Result<String, RuntimeError> {
        path_safe("image reference", image)?;
        let data = self
            .client
            .images()
            .get(image)
            .inspect()
            .await
            .map_err(classify)?;
        Ok(data
            .user
            .filter(|user| !user.is_empty())
            .or_else(|| data.config.and_then(|config| config.user))
            .unwrap_or_default())
    }

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: &[RegistryCredential],
    ) -> Result<(), RuntimeError> {
        path_safe("image reference", image)?;
        match policy {
            PullPolicy::IfNotPresent if self.image_present(image).await? => return Ok(()),
            PullPolicy::Never if self.image_present(image).await? => return Ok(()),
            PullPolicy::Never => {
                return Err(RuntimeError::ImageNeverPull(format!(
                    "Container image \"{image}\" is not present with pull policy of Never"
                )))
            }
            PullPolicy::IfNotPresent | PullPolicy::Always => {}
        }
        let failed =
            |e: String| RuntimeError::ImagePull(format!("Failed to pull image \"{image}\": {e}"));
        if credentials.is_empty() {
            return self.pull(image, None).await.map_err(failed);
        }
        // The kubelet's aggregate of every credential's failure.
        let mut errors = Vec::new();
        for credential in credentials {
            let auth = RegistryAuth::builder()
                .username(&credential.username)
                .password(&credential.password)
                .build();
            match self.pull(image, Some(auth)).await {
                Ok(()) => return Ok(()),
                Err(e) => errors.push(e),
            }
        }
        Err(failed(match errors.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        }))
    }

    async fn create_container(
        &self,
        pod_id: &str,
        plan: &ContainerPlan,
    ) -> Result<String, RuntimeError> {
        path_safe("image reference", &plan.image)?;
        let mut opts = ContainerCreateOpts::builder()
            .name(&plan.name)
            .pod(pod_id)
            .image(&plan.image)
            .labels(plan.labels.clone())
            .env(plan.env.iter().cloned())
            .terminal(plan.tty)
            .stdin(plan.stdin)
            .privileged(plan.privileged)
            .read_only_fs(plan.read_only_root_fs)
            .no_new_privilages(plan.no_new_privileges)
            .add_capabilities(plan.cap_add.iter().cloned())
            .drop_capabilities(plan.cap_drop.iter().cloned())
            .groups(plan.supplemental_groups.iter().map(u32::to_string))
            .sysctl(plan.sysctls.clone())
            .stop_timeout(plan.stop_timeout_secs)
            // catatonit as PID 1 forwards SIGTERM, as a kubelet's runtime delivers it;
            // in another container's process namespace, that container's PID 1 is.
            .init(plan.pid_namespace_of.is_none())
            .mounts(
                plan.mounts
                    .iter()
                    .map(|m| bind_mount(&m.host_path(), &m.container_path, m.read_only))
                    .chain(std::iter::once(bind_mount(
                        &plan.termination_message.host_file,
                        &plan.termination_message.container_path,
                        false,
                    ))),
            );
        if let Some(target) = &plan.pid_namespace_of {
            path_safe("container", target)?;
            opts = opts.pid_namespace(podman_api::models::Namespace {
                nsmode: Some("container".into()),
                value: Some(target.clone()),
            });
        }
        if let Some(command) = &plan.command {
            opts = opts.entrypoint(command.clone());
        }
        if let Some(args) = &plan.args {
            opts = opts.command(args.clone());
        } else if plan.command.is_some() {
            // Kubernetes: a command without args drops the image's CMD.
            opts = opts.command(Vec::<String>::new());
        }
        if let Some(dir) = &plan.working_dir {
            // As the kubelet's runtimes, a missing working directory is created.
            opts = opts.work_dir(dir).create_working_dir(true);
        }
        if let Some(user) = &plan.user {
            opts = opts.user(user);
        }
        if plan.memory_limit_bytes.is_some() || plan.cpu_limit_millis.is_some() {
            opts = opts.resource_limits(resource_limits(plan)?);
        }
        let created = self
            .client
            .containers()
            .create(&opts.build())
            .await
            .map_err(classify)?;
        Ok(created.id)
    }

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError> {
        path_safe("container", id)?;
        self.client
            .containers()
            .get(id)
            .start(None)
            .await
            .map_err(classify)
    }

    async fn pause_container(&self, id: &str) -> Result<(), RuntimeError> {
        path_safe("container", id)?;
        self.client
            .containers()
            .get(id)
            .pause()
            .await
            .map_err(classify)
    }

    async fn unpause_container(&self, id: &str) -> Result<(), RuntimeError> {
        path_safe("container", id)?;
        self.client
            .containers()
            .get(id)
            .unpause()
            .await
            .map_err(classify)
    }

    async fn container_state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        self.inspect_state(id).await
    }

    async fn container_events(
        &self,
        agent: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<ContainerEvent>, RuntimeError> {
        path_safe("agent", agent)?;
        let opts = EventsOpts::builder()
            .stream(true)
            .filters([
                ("type".to_string(), vec!["container".to_string()]),
                (
                    "label".to_string(),
                    vec![format!("{}={agent}", labels::AGENT)],
                ),
            ])
            .build();
        let client = self.client.clone();
        let (events, received) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        tokio::spawn(async move {
            let mut stream = client.events(&opts);
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { break };
                let Some(event) = container_event(&event) else {
                    continue;
                };
                // Full: the supervisors are behind anyway and look at every container
                // at their next resync.
                match events.try_send(event) {
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
                    Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {}
                }
            }
        });
        Ok(received)
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let container = self.client.containers().get(id);
        if self.inspect_state(id).await?.status != ContainerStatus::Running {
            return Ok(());
        }
        // Podman 4.3 ignores the stop timeout given with the request: signal and wait
        // ourselves, so that the pod's own grace period holds.
        if !grace.is_zero() {
            match container.send_signal("SIGTERM").await.map_err(classify) {
                Ok(()) => {}
                Err(RuntimeError::Invalid(_)) => return Ok(()), // exited meanwhile
                Err(e) => return Err(e),
            }
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline {
                if self.inspect_state(id).await?.status != ContainerStatus::Running {
                    return Ok(());
                }
                tokio::time::sleep(STOP_POLL).await;
            }
        }
        match container.kill().await.map_err(classify) {
            Ok(()) | Err(RuntimeError::Invalid(_)) => {}
            Err(e) => return Err(e),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if self.inspect_state(id).await?.status != ContainerStatus::Running {
                return Ok(());
            }
            tokio::time::sleep(STOP_POLL).await;
        }
        Err(RuntimeError::Unavailable(format!(
            "container {id} still runs 10 s after SIGKILL"
        )))
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        path_safe("container", id)?;
        self.client
            .containers()
            .get(id)
            .delete(&ContainerDeleteOpts::builder().force(true).build())
            .await
            .map_err(classify)
    }

    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError> {
        path_safe("container", id)?;
        let container = self.client.containers().get(id);
        let exec = container
            .create_exec(
                &ExecCreateOpts::builder()
                    .command(cmd.to_vec())
                    .attach_stdout(true)
                    .attach_stderr(true)
                    .build(),
            )
            .await
            .map_err(classify)?;
        let run = async {
            let opts = ExecStartOpts::builder().build();
            let mut output = Vec::new();
            if let Some(mut stream) = exec.start(&opts).await.map_err(classify)? {
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => {
                            let bytes = chunk.to_vec();
                            let room = MAX_EXEC_OUTPUT.saturating_sub(output.len());
                            output.extend_from_slice(&bytes[..bytes.len().min(room)]);
                        }
                        Err(e) => return Err(RuntimeError::Unavailable(e.to_string())),
                    }
                }
            }
            let info = exec.inspect().await.map_err(classify)?;
            let exit_code = info
                .get("ExitCode")
                .and_then(|c| c.as_i64())
                .and_then(|c| i32::try_from(c).ok())
                .unwrap_or(-1);
            Ok(ExecOutput { exit_code, output })
        };
        tokio::time::timeout(timeout, run).await.map_err(|_| {
            RuntimeError::Unavailable(format!("command {cmd:?} timed out after {timeout:?}"))
        })?
    }

    async fn exec_interactive(
        &self,
        id: &str,
        cmd: &[String],
        streams: Streams,
        size: Option<TerminalSize>,
    ) -> Result<Interactive, RuntimeError> {
        path_safe("container", id)?;
        let exec = self
            .client
            .containers()
            .get(id)
            .create_exec(
                &ExecCreateOpts::builder()
                    .command(cmd.to_vec())
                    .attach_stdin(streams.stdin)
                    .attach_stdout(streams.stdout)
                    .attach_stderr(streams.stderr)
                    .tty(streams.tty)
                    .build(),
            )
            .await
            .map_err(classify)?;
        let mut start = ExecStartOpts::builder().tty(streams.tty);
        if let Some(size) = size.filter(|_| streams.tty) {
            start = start
                .width(usize::from(size.width))
                .height(usize::from(size.height));
        }
        let started = exec.start(&start.build()).await.map_err(classify)?;
        let Some(multiplexer) = started else {
            return Err(RuntimeError::Unavailable("exec started detached".into()));
        };
        Ok(interactive(multiplexer, Box::new(PodmanExec(exec))))
    }

    async fn attach(&self, id: &str, streams: Streams) -> Result<Interactive, RuntimeError> {
        path_safe("container", id)?;
        let container = self.client.containers().get(id);
        let multiplexer = container
            .attach(
                &ContainerAttachOpts::builder()
                    .stdin(streams.stdin)
                    .stdout(streams.stdout)
                    .stderr(streams.stderr)
                    .build(),
            )
            .await
            .map_err(classify)?;
        Ok(interactive(multiplexer, Box::new(PodmanAttach(container))))
    }

    async fn usage(&self, ids: &[String]) -> Result<HashMap<String, Usage>, RuntimeError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        for id in ids {
            path_safe("container", id)?;
        }
        let opts = ContainerStatsOpts::builder()
            .containers(ids.to_vec())
            .build();
        let answer = self
            .client
            .containers()
            .stats(&opts)
            .await
            .map_err(classify)?;
        let number = |stat: &serde_json::Value, key: &str| stat[key].as_u64().unwrap_or(0);
        Ok(answer["Stats"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|stat| {
                let id = stat["ContainerID"].as_str()?.to_owned();
                let usage = Usage {
                    cpu_nanos: number(stat, "CPUNano"),
                    memory_bytes: number(stat, "MemUsage"),
                };
                Some((id, usage))
            })
            .collect())
    }

    async fn logs(&self, id: &str, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        path_safe("container", id)?;
        // Fails early (not found) before the stream is handed out.
        self.inspect_state(id).await?;
        let container = self.client.containers().get(id);
        let build = |follow: bool, tail: Option<u64>| {
            let mut opts = ContainerLogsOpts::builder()
                .stdout(true)
                .stderr(true)
                .follow(follow)
                .timestamps(options.timestamps);
            if let Some(lines) = tail {
                opts = opts.tail(lines.to_string());
            }
            if let Some(since) = options.since {
                opts = opts.since(since.as_second().to_string());
            }
            opts.build()
        };
        // Podman loses the lines written between reading the tail and following, so a
        // followed tail reads the whole log and skips all but the last lines.
        let (opts, mut skip_lines) = match (options.follow, options.tail_lines) {
            (true, Some(tail)) => {
                let mut lines = 0u64;
                let mut backlog = container.logs(&build(false, None));
                while let Some(chunk) = backlog.next().await {
                    let chunk = chunk.map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
                    lines += chunk.to_vec().iter().filter(|&&b| b == b'\n').count() as u64;
                }
                (build(true, None), lines.saturating_sub(tail))
            }
            (follow, tail) => (build(follow, tail), 0),
        };
        // The client's stream borrows the container handle, so a task owns both and
        // hands chunks over a small channel: a slow reader stops the task reading.
        let (tx, rx) = tokio::sync::mpsc::channel(LOG_CHUNKS_IN_FLIGHT);
        tokio::spawn(async move {
            let mut stream = container.logs(&opts);
            while let Some(chunk) = stream.next().await {
                let item = chunk
                    .map(|c| skip_lines_of(c.to_vec(), &mut skip_lines))
                    .map_err(|e| RuntimeError::Unavailable(e.to_string()));
                if matches!(&item, Ok(bytes) if bytes.is_empty()) {
                    continue;
                }
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }

    async fn remove_pod(&self, pod_id: &str) -> Result<(), RuntimeError> {
        path_safe("pod", pod_id)?;
        let pods = self.client.pods();
        let pod = pods.get(pod_id);
        let name = pod.inspect().await.map_err(classify)?.name;
        pod.remove().await.map(|_| ()).map_err(classify)?;
        match name {
            Some(name) => self.remove_memory_volumes(&name).await,
            None => Ok(()),
        }
    }

    async fn volume_dir(&self, volume: &str) -> Result<PathBuf, RuntimeError> {
        path_safe("volume", volume)?;
        let found = self
            .client
            .volumes()
            .get(volume)
            .inspect()
            .await
            .map_err(classify)?;
        Ok(PathBuf::from(found.mountpoint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipping_lines_spans_chunks() {
        let mut skip = 2;
        assert_eq!(skip_lines_of(b"one\ntw".to_vec(), &mut skip), b"");
        assert_eq!(skip_lines_of(b"o\nthree\n".to_vec(), &mut skip), b"three\n");
        assert_eq!(skip, 0);
        assert_eq!(skip_lines_of(b"four\n".to_vec(), &mut skip), b"four\n");
    }

    #[test]
    fn a_process_gone_during_inspection_is_told_from_other_faults() {
        // The message of Podman 4.3's 500 when a container exited while inspected (seen in CI).
        let vanished = podman_message(
            r#"{"cause":"no such process","message":"read /proc/21996/cgroup: no such process: no such process","response":500}"#,
        );
        assert!(exited_while_inspected(&vanished));
        let locked = podman_message(
            r#"{"cause":"database is locked","message":"database is locked","response":500}"#,
        );
        assert!(!exited_while_inspected(&locked));
    }
}
