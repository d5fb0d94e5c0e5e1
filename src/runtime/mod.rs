//! The container runtime an agent drives, behind a small trait.
//!
//! [`Runtime`] is what the agent's pod supervisor needs and nothing more; [`podman`]
//! implements it over Podman's REST API. Plans ([`PodPlan`], [`ContainerPlan`]) are
//! produced from Kubernetes specs by the pure [`translate`] module, so no Kubernetes
//! type reaches the runtime.

pub mod bridge;
pub mod dns;
pub mod image_ref;
pub mod podman;
pub mod registry_auth;
pub mod translate;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::jiff::Timestamp;

use crate::wire::RegistryCredential;

/// Labels BeeMesh puts on every Podman pod and container it creates.
pub mod labels {
    pub const POD_UID: &str = "io.beemesh.pod.uid";
    pub const POD_NAMESPACE: &str = "io.beemesh.pod.namespace";
    pub const POD_NAME: &str = "io.beemesh.pod.name";
    pub const EPOCH: &str = "io.beemesh.epoch";
    pub const AGENT: &str = "io.beemesh.agent";
    /// The peer ID of the owner that assigned the pod.
    pub const OWNER: &str = "io.beemesh.owner";
    /// On containers: the Kubernetes container name.
    pub const CONTAINER: &str = "io.beemesh.container";
    /// On containers: "init" or "app".
    pub const CONTAINER_KIND: &str = "io.beemesh.container.kind";
    /// On containers: 0 for the first instance, +1 for each restart.
    pub const ATTEMPT: &str = "io.beemesh.attempt";
    /// On memory volumes: the Podman pod whose sandbox holds them.
    pub const PODMAN_POD: &str = "io.beemesh.podman-pod";
    /// On networks: a mesh pod subnet's network (see [`super::PodNetwork`]).
    pub const NETWORK: &str = "io.beemesh.network";
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The image is absent and could not be pulled (or pulling is not allowed).
    #[error("{0}")]
    ImagePull(String),
    /// The image is absent and the pull policy is Never.
    #[error("{0}")]
    ImageNeverPull(String),
    /// The object (pod, container) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The runtime refused the request as invalid (bad spec, port in use, ...).
    #[error("{0}")]
    Invalid(String),
    /// The runtime could not be reached or failed; retrying may help.
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
}

/// Whether `text` uses only the characters of image references and Podman IDs. The
/// Podman client puts such names into URL paths unescaped (and panics on what it
/// cannot parse), so the same rule guards validation and every runtime request.
pub fn is_reference_text(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 4096
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'))
}

/// When to pull an image, as Kubernetes' `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A host port published by the pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMapping {
    pub container_port: u16,
    pub host_port: u16,
    pub host_ip: Option<String>,
    pub protocol: Protocol,
}

/// One Podman pod: the shared network namespace of a Kubernetes pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodPlan {
    /// `<namespace>_<name>_<uid8>_<epoch>`
    pub name: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortMapping>,
    /// The pod's resolv.conf; None for the runtime's default (the agent's own).
    pub dns: Option<dns::ResolvConf>,
    /// What of the pod's `dnsConfig` had to be cut (the kubelet's `DNSConfigForming`).
    pub dns_warnings: Vec<String>,
    /// `/etc/hosts` entries from `hostAliases`: (hostname, address), in the spec's order.
    pub host_aliases: Vec<(String, IpAddr)>,
    /// Memory-backed emptyDirs: tmpfs volumes that live as long as the pod's sandbox.
    pub memory_volumes: Vec<MemoryVolume>,
    /// The network of the agent's mesh pod subnet; None for the runtime's default.
    pub network: Option<PodNetwork>,
}

/// A bridge network on one subnet of the mesh pod CIDR, shared by the pods the agent
/// runs on it and made when the first needs it. Named after its subnet, so that agents
/// sharing one Podman share it rather than collide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub name: String,
    pub subnet: ipnet::Ipv4Net,
    /// The subnet's first address, the bridge's own.
    pub gateway: std::net::Ipv4Addr,
}

impl PodNetwork {
    pub fn on(subnet: ipnet::Ipv4Net) -> PodNetwork {
        let subnet = subnet.trunc();
        PodNetwork {
            name: format!("beemesh-{}-{}", subnet.network(), subnet.prefix_len()),
            gateway: std::net::Ipv4Addr::from(u32::from(subnet.network()).saturating_add(1)),
            subnet,
        }
    }
}

/// An emptyDir with `medium: Memory`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryVolume {
    /// The volume's name in the pod spec.
    pub name: String,
    /// The runtime's volume, unique to this copy of the pod.
    pub volume: String,
    /// The tmpfs's size; None for the tmpfs default.
    pub size_bytes: Option<u64>,
    /// The pod's `fsGroup`, which owns the volume's root (setgid), as with the kubelet.
    pub group: Option<u32>,
}

/// A bind mount of one of the pod's volumes, or of a subPath in it, from the agent's host
/// into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The volume's name in the pod spec.
    pub volume: String,
    /// The volume's directory on the agent.
    pub volume_dir: PathBuf,
    /// The mount's `subPath`: relative, without `..` or `.` (the spec was validated);
    /// None for the whole volume. Containers may have written the volume, so the agent
    /// must check that no component of it is a symbolic link before the runtime mounts
    /// [`Mount::host_path`] (`agent::subpath`).
    pub sub_path: Option<PathBuf>,
    pub container_path: String,
    pub read_only: bool,
}

impl Mount {
    /// What the runtime bind-mounts: the volume's directory, or the subPath in it.
    pub fn host_path(&self) -> PathBuf {
        match &self.sub_path {
            Some(sub_path) => self.volume_dir.join(sub_path),
            None => self.volume_dir.clone(),
        }
    }
}

/// The file a container may write its termination message to: `host_file` on the
/// agent, bind-mounted at `container_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminationMessage {
    pub host_file: PathBuf,
    pub container_path: String,
}

/// One container instance to create inside a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerPlan {
    /// Unique Podman name, `<pod name>_<container>_<attempt>`.
    pub name: String,
    pub image: String,
    pub pull_policy: PullPolicy,
    /// Replaces the image's entrypoint (Kubernetes `command`).
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd (Kubernetes `args`).
    pub args: Option<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub memory_limit_bytes: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    pub mounts: Vec<Mount>,
    /// The agent makes the file (empty, writable by any user) before creating the
    /// container.
    pub termination_message: TerminationMessage,
    pub labels: BTreeMap<String, String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdin_once: bool,
    /// `runAsUser[:runAsGroup]`
    pub user: Option<String>,
    pub privileged: bool,
    pub read_only_root_fs: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
    /// Capability names as Kubernetes writes them (`NET_ADMIN`, `ALL`).
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// Groups the process gets besides its own (`supplementalGroups`, `fsGroup`).
    pub supplemental_groups: Vec<u32>,
    /// The pod's (safe, namespaced) sysctls.
    pub sysctls: BTreeMap<String, String>,
    /// Seconds Podman waits after SIGTERM before SIGKILL when stopping.
    pub stop_timeout_secs: u64,
    /// The container (runtime ID) whose process namespace this one joins: an
    /// ephemeral container's target, so that it sees and can trace its processes.
    pub pid_namespace_of: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    Created,
    Running,
    Exited,
    /// Frozen (the agent pauses a pod's containers while it prepares another's subPath).
    Paused,
    /// Stopping, removing, or a state Podman added later.
    Other,
}

/// What the runtime knows of one container instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerState {
    pub status: ContainerStatus,
    pub exit_code: Option<i32>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// Podman's message when the container failed to start.
    pub error: Option<String>,
    /// The image it was made from, as the kubelet's `imageID` shows it (see
    /// [`image_ref::image_id`]); None where the runtime did not say.
    pub image_ref: Option<String>,
    /// The disk it takes: its writable layer and its log; None where not measured.
    pub disk_bytes: Option<u64>,
}

/// A container as found by [`Runtime::list_pods`].
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeContainer {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub state: ContainerState,
}

/// A pod as found by [`Runtime::list_pods`], with its containers (not the infra one).
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimePod {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub containers: Vec<RuntimeContainer>,
}

/// What part of a container's output to read, as the kubelet's log endpoint asks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep streaming as the container writes.
    pub follow: bool,
    /// Only the last lines.
    pub tail_lines: Option<u64>,
    /// Prefix each line with its RFC 3339 time.
    pub timestamps: bool,
    /// Only what was written at or after this time.
    pub since: Option<Timestamp>,
}

/// A container's output, as it comes; ends when the container's log does (or, when
/// following, when the container exits).
pub type LogStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Vec<u8>, RuntimeError>> + Send>>;

pub use crate::wire::Streams;

/// Where a pod is on its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodAddress {
    pub ip: IpAddr,
    /// Its interface's hardware address, when the runtime says.
    pub mac: Option<MacAddress>,
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl std::str::FromStr for MacAddress {
    type Err = String;

    /// Six hex octets separated by colons, as `ip link` and Podman write them.
    fn from_str(text: &str) -> Result<MacAddress, String> {
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts
                .next()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("{text:?} is not a MAC address"))?;
            *octet = u8::from_str_radix(part, 16)
                .map_err(|_| format!("{text:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{text:?} is not a MAC address"));
        }
        Ok(MacAddress(octets))
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Output of an interactive session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// A command running in a container with its streams connected (`kubectl exec`).
pub struct Interactive {
    /// Output as it comes; ends when the command's streams close.
    pub output: std::pin::Pin<Box<dyn futures::Stream<Item = Result<Output, RuntimeError>> + Send>>,
    /// The command's stdin; closing it sends EOF.
    pub stdin: std::pin::Pin<Box<dyn futures::AsyncWrite + Send>>,
    pub control: Box<dyn SessionControl>,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub width: u16,
    pub height: u16,
}

/// What else a session can do: resize its terminal, and tell its exit code.
#[async_trait]
pub trait SessionControl: Send + Sync {
    async fn resize(&self, width: u16, height: u16) -> Result<(), RuntimeError>;
    /// The exit code once the command has ended (None while it runs).
    async fn exit_code(&self) -> Result<Option<i32>, RuntimeError>;
}

/// A container's resource usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// CPU time used since the container started, in nanoseconds.
    pub cpu_nanos: u64,
    pub memory_bytes: u64,
}

/// A container of a pod changed state (started, died, paused, removed, ...): its
/// supervisor should look at it now rather than at its next resync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub pod: crate::wire::PodUid,
    pub epoch: crate::wire::Epoch,
}

/// The result of a command run inside a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub output: Vec<u8>,
}

/// The container runtime, as the agent's pod supervisor sees it.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Checks that the runtime answers.
    async fn ping(&self) -> Result<(), RuntimeError>;

    /// Every pod carrying `label_key=label_value`, with its containers.
    async fn list_pods(
        &self,
        label_key: &str,
        label_value: &str,
    ) -> Result<Vec<RuntimePod>, RuntimeError>;

    /// Creates (but does not start) a pod with its memory volumes, which its infra
    /// container holds mounted while it runs (a tmpfs whose last user stops is
    /// emptied); returns its ID.
    async fn create_pod(&self, plan: &PodPlan) -> Result<String, RuntimeError>;

    /// Starts the pod's infra container, so that its network namespace exists (and its
    /// memory volumes are mounted). On a pod network, that network's bridge is then
    /// kept on one MAC address (see [`bridge`]).
    async fn start_pod(
        &self,
        pod_id: &str,
        network: Option<&PodNetwork>,
    ) -> Result<(), RuntimeError>;

    /// Where a memory volume of a started pod is on the host, for bind mounts.
    async fn volume_dir(&self, volume: &str) -> Result<PathBuf, RuntimeError>;

    /// The pod's addresses, once its network is up.
    async fn pod_address(&self, pod_id: &str) -> Result<Option<PodAddress>, RuntimeError>;

    /// The pod's IP address, once its network is up.
    async fn pod_ip(&self, pod_id: &str) -> Result<Option<IpAddr>, RuntimeError> {
        Ok(self.pod_address(pod_id).await?.map(|a| a.ip))
    }

    /// Makes sure `image` is present according to `policy`, pulling if needed: with
    /// each of `credentials` in turn until one succeeds (as the kubelet tries its
    /// keyring's matches), or anonymously when there are none. A credential is given
    /// with its pull request only, never stored.
    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        credentials: &[RegistryCredential],
    ) -> Result<(), RuntimeError>;

    /// The user a present image runs as, as its configuration says (`uid`, `name`,
    /// `uid:gid`; empty when unset, which is root).
    async fn image_user(&self, image: &str) -> Result<String, RuntimeError>;

    /// Creates a container in a pod; returns its ID.
    async fn create_container(
        &self,
        pod_id: &str,
        plan: &ContainerPlan,
    ) -> Result<String, RuntimeError>;

    async fn start_container(&self, id: &str) -> Result<(), RuntimeError>;

    /// Freezes every process of a running container (the cgroup freezer) until
    /// [`Runtime::unpause_container`].
    async fn pause_container(&self, id: &str) -> Result<(), RuntimeError>;

    async fn unpause_container(&self, id: &str) -> Result<(), RuntimeError>;

    async fn container_state(&self, id: &str) -> Result<ContainerState, RuntimeError>;

    /// State changes of the containers labelled `io.beemesh.agent=<agent>`, as they
    /// happen. The channel closes when the runtime's stream ends (Podman restarted,
    /// say); events missed until the caller subscribes again are not replayed.
    async fn container_events(
        &self,
        agent: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<ContainerEvent>, RuntimeError>;

    /// Sends SIGTERM, then SIGKILL after `grace`; returns once the container exited.
    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;

    /// Removes a container (forcefully).
    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError>;

    /// Runs `cmd` in a running container and waits for it, at most `timeout`.
    async fn exec(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, RuntimeError>;

    /// Removes a pod and everything in it, stopping what still runs.
    async fn remove_pod(&self, pod_id: &str) -> Result<(), RuntimeError>;

    /// Current resource usage of running containers, by container ID (containers that
    /// are not running are left out).
    async fn usage(&self, ids: &[String]) -> Result<HashMap<String, Usage>, RuntimeError>;

    /// Starts `cmd` in a running container with the chosen streams connected; with a
    /// terminal, of `size` from the start when given (programs read it once, at start).
    async fn exec_interactive(
        &self,
        id: &str,
        cmd: &[String],
        streams: Streams,
        size: Option<TerminalSize>,
    ) -> Result<Interactive, RuntimeError>;

    /// Connects to the streams of the container's own process.
    async fn attach(&self, id: &str, streams: Streams) -> Result<Interactive, RuntimeError>;

    /// The container's stdout and stderr, interleaved as written.
    async fn logs(&self, id: &str, options: &LogOptions) -> Result<LogStream, RuntimeError>;
}

/// Stops a pod's containers together (SIGKILL after `grace`), then removes the pod: a
/// forced removal alone would give each container its own stop timeout in turn.
pub async fn stop_and_remove(
    runtime: &dyn Runtime,
    pod: &RuntimePod,
    grace: Duration,
) -> Result<(), RuntimeError> {
    let stops = pod
        .containers
        .iter()
        .map(|c| runtime.stop_container(&c.id, grace));
    for result in futures::future::join_all(stops).await {
        if let Err(e) = result {
            tracing::debug!(podman_pod = %pod.name, error = %e, "cannot stop; removing all the same");
        }
    }
    runtime.remove_pod(&pod.id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_are_six_hex_octets_and_nothing_else() {
        let mac: MacAddress = "0A:58:0a:40:01:ff".parse().expect("mac");
        assert_eq!(mac.to_string(), "0a:58:0a:40:01:ff");
        for bad in [
            "",
            "0a:58:0a:40:01",
            "0a:58:0a:40:01:ff:00",
            "0a:58:0a:40:01:f",
            "0a:58:0a:40:01:fg",
            "0a-58-0a-40-01-ff",
            "0a:58:0a:40:01:ff; drop",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?}");
        }
    }
}
