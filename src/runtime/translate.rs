//! Kubernetes pod specs to runtime plans.
//!
//! Everything here is pure: a [`Pod`] goes in; [`PodPlan`]s and [`ContainerPlan`]s, or a
//! [`SpecError`] saying why the pod cannot run here, come out. The rules follow what the
//! kubelet and the API server's defaulting do, so that a pod behaves as it would on a
//! cluster node. What the plans cannot express is refused by [`validate`] with a message
//! the user sees in the pod status, rather than run differently without a word. Fields
//! that only the control plane acts on are accepted and ignored, because pods coming from
//! an API server always carry them.
//!
//! Choices made where Kubernetes leaves room or BeeMesh cannot follow it:
//! - Grace period: the kubelet never gives a container less than 2 seconds between
//!   SIGTERM and SIGKILL, so [`grace_period_secs`] is `max(value, 2)`, with the value
//!   taken from `metadata.deletionGracePeriodSeconds`, else
//!   `spec.terminationGracePeriodSeconds`, else 30 (the API server's default).
//! - `runAsNonRoot` is checked as the kubelet checks it, when the container is created,
//!   against `runAsUser` or the image's user ([`verify_run_as_non_root`]).
//! - `allowPrivilegeEscalation: false` sets `no_new_privs`; capabilities are added and
//!   dropped by name, as the kubelet's runtime does.
//! - `dnsPolicy: ClusterFirst` is `Default` (the agent's resolver): cluster DNS is not
//!   reachable from agents; the node says so with the `MissingClusterDNS` event of a
//!   kubelet without cluster DNS (`runtime::dns`).
//! - emptyDir with `medium: Memory` is a tmpfs the runtime keeps for the pod sandbox
//!   ([`memory_volumes`]), sized as the kubelet sizes it; `sizeLimit` of a disk emptyDir
//!   is not enforced.
//! - Ports of init containers get no host mapping, as with the kubelet; a sidecar's do.
//! - `ephemeral-storage` limits and emptyDir `sizeLimit` are enforced by eviction, as
//!   the kubelet does (`agent::eviction`); extended resources (GPUs, hugepages, ...)
//!   are refused, since no agent can provide them.
//! - `resourceFieldRef` env vars are supported, except `limits.*` of a container without
//!   that limit: the kubelet then uses the node's allocatable amount, which plans lack.
//! - Security settings equal to what Podman does anyway (seccomp and AppArmor
//!   `RuntimeDefault`, `procMount: Default`, empty `seLinuxOptions`) are accepted.
//!
//! Every [`Mount::volume_dir`] lies under [`PlanContext::volumes_dir`] (emptyDirs) or
//! [`PlanContext::files_dir`] (volumes of files from the API, which may hold secrets: kept
//! in memory-backed storage); the agent creates `<volumes_dir>/<name>` for each of
//! [`empty_dirs`] (mode 0777, as the kubelet does). A `subPath` is checked here as text
//! only (relative, no `..`): what it names inside the volume is up to the containers,
//! which write emptyDirs, symbolic links included, and a bind mount follows links. So
//! before the runtime mounts [`Mount::host_path`], the agent opens [`Mount::sub_path`]
//! from the volume's directory without following any link, refusing one that has a link
//! in it, and makes it when it does not exist yet, as the kubelet does (`agent::subpath`,
//! and the supervisor, which keeps the pod's containers that can write the volume paused
//! until the mount is made).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{
    AppArmorProfile, Container, ContainerPort, EnvVar, EnvVarSource, HostAlias, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, Pod, PodDNSConfig, PodSecurityContext, PodSpec, Probe,
    ResourceFieldSelector, ResourceRequirements, SELinuxOptions, SeccompProfile, SecurityContext,
    Volume, VolumeMount, WindowsSecurityContextOptions,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{
    dns, labels, ContainerPlan, MemoryVolume, Mount, PodNetwork, PodPlan, PortMapping, Protocol,
    PullPolicy, TerminationMessage,
};
use crate::wire::{Epoch, PodRef, PodUid, Resources};

/// A reason a pod cannot run here; Display is "<field path>: <message>", shown to users as
/// the pod status message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Whether a container runs before the pod's app containers (and must finish), is one
/// of them, or was added to the running pod to debug it (`kubectl debug`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerKind {
    Init,
    App,
    Ephemeral,
}

impl ContainerKind {
    /// The value of the `io.beemesh.container.kind` label.
    fn label(self) -> &'static str {
        match self {
            ContainerKind::Init => "init",
            ContainerKind::App => "app",
            ContainerKind::Ephemeral => "ephemeral",
        }
    }

    /// The PodSpec field that lists containers of this kind, for field paths.
    fn spec_field(self) -> &'static str {
        match self {
            ContainerKind::Init => "initContainers",
            ContainerKind::App => "containers",
            ContainerKind::Ephemeral => "ephemeralContainers",
        }
    }
}

/// What the agent knows when it creates a container.
#[derive(Debug, Clone, Copy)]
pub struct PlanContext<'a> {
    /// The agent's peer ID (label `io.beemesh.agent`).
    pub agent: &'a str,
    /// The owner's peer ID (label `io.beemesh.owner`).
    pub owner: &'a str,
    pub epoch: Epoch,
    /// Per-pod directory on the agent where emptyDir volumes live: `<volumes_dir>/<name>`.
    pub volumes_dir: &'a Path,
    /// Per-pod directory, in memory-backed storage, where the volumes of files from the
    /// API (configMap, secret, downwardAPI, projected) live: `<files_dir>/<name>`.
    pub files_dir: &'a Path,
    /// For env fieldRef `status.podIP` / `status.podIPs`.
    pub pod_ip: Option<IpAddr>,
    /// For `status.hostIP` / `status.hostIPs`.
    pub host_ip: Option<IpAddr>,
    /// The agent's subnet of its owner's mesh pod CIDR, where the pod's network is.
    pub pod_subnet: Option<ipnet::Ipv4Net>,
    /// The cluster's DNS, for `ClusterFirst` pods, when their owner relays it.
    pub cluster_dns: Option<&'a dns::ClusterDns>,
    /// For `spec.nodeName`.
    pub node_name: &'a str,
    /// The agent's own resolver configuration, the base of a pod's `dnsConfig`.
    pub host_dns: &'a dns::ResolvConf,
    /// Where each memory-backed emptyDir (a tmpfs the runtime keeps for the pod, see
    /// [`memory_volumes`]) is on the agent, by volume name, once the pod's sandbox runs.
    pub memory_dirs: &'a BTreeMap<String, PathBuf>,
    /// The directory of the pod's group socket, for a pod of a stateful workload
    /// (mounted at [`crate::raft::SOCKET_DIR_IN_CONTAINER`] in every container).
    pub group_socket_dir: Option<&'a Path>,
}

const DEFAULT_NAMESPACE: &str = "default";
/// The API server's default for `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_PERIOD_SECS: i64 = 30;
/// The kubelet's `minimumGracePeriodInSeconds`: every container gets this long to exit.
const MIN_GRACE_PERIOD_SECS: i64 = 2;
/// Linux hostnames hold at most 64 bytes including the terminating NUL.
const HOSTNAME_MAX_LEN: usize = 63;
/// Why configMap and secret references are refused where they are still unresolved: a
/// node connected to a Kubernetes API server fills them in before placement.
const NEEDS_API: &str = "configMaps and secrets need a Kubernetes API server (pods from \
                         manifest files cannot use them)";
/// User and group IDs are int32 in the Kubernetes API.
const MAX_ID: i64 = i32::MAX as i64;

// ---------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------

/// The pod's identity: `metadata.uid` and `metadata.name` are required, the namespace
/// defaults to "default".
pub fn pod_ref(pod: &Pod) -> Result<PodRef, SpecError> {
    let meta = &pod.metadata;
    let uid =
        non_empty(meta.uid.as_deref()).ok_or_else(|| SpecError::new("metadata.uid", "required"))?;
    let name = non_empty(meta.name.as_deref())
        .ok_or_else(|| SpecError::new("metadata.name", "required"))?;
    let namespace = non_empty(meta.namespace.as_deref()).unwrap_or(DEFAULT_NAMESPACE);
    Ok(PodRef {
        uid: PodUid(uid.to_owned()),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// The Podman pod name, `<namespace>_<name>_<uid>_<epoch>`: unique per placement (the
/// whole UID: namesakes whose UIDs share a prefix, as a manifest's may, must not
/// collide), and readable in `podman pod ps`.
pub fn podman_pod_name(pod: &PodRef, epoch: Epoch) -> String {
    format!("{}_{}_{}_{}", pod.namespace, pod.name, pod.uid.0, epoch)
}

/// The labels of the Podman pod, which every container of it carries too.
fn pod_labels(pod: &PodRef, ctx: &PlanContext) -> BTreeMap<String, String> {
    [
        (labels::POD_UID, pod.uid.0.clone()),
        (labels::POD_NAMESPACE, pod.namespace.clone()),
        (labels::POD_NAME, pod.name.clone()),
        (labels::EPOCH, ctx.epoch.to_string()),
        (labels::AGENT, ctx.agent.to_owned()),
        (labels::OWNER, ctx.owner.to_owned()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect()
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

/// Checks that the pod can run on an agent exactly as written; the first problem found
/// is the error.
pub fn validate(pod: &Pod) -> Result<(), SpecError> {
    validate_identity(&pod_ref(pod)?)?;
    crate::raft::group_of(pod).map_err(|message| {
        SpecError::new(
            format!("metadata.annotations[{}]", crate::raft::GROUP_ANNOTATION),
            message,
        )
    })?;
    let spec = spec_of(pod)?;
    validate_pod_fields(spec)?;
    if let Some(security) = &spec.security_context {
        validate_pod_security(security)?;
    }
    // Volumes before containers: a refused volume is the root cause of errors in the
    // mounts that use it.
    validate_volumes(volumes_of(spec))?;
    validate_containers(spec)
}

fn spec_of(pod: &Pod) -> Result<&PodSpec, SpecError> {
    pod.spec
        .as_ref()
        .ok_or_else(|| SpecError::new("spec", "required"))
}

fn volumes_of(spec: &PodSpec) -> &[Volume] {
    spec.volumes.as_deref().unwrap_or_default()
}

/// Namespace, name and UID end up in Podman names, which allow only `[a-zA-Z0-9_.-]`.
fn validate_identity(pod: &PodRef) -> Result<(), SpecError> {
    refuse_if(
        !is_dns_subdomain(&pod.name),
        "metadata.name",
        "must be a lowercase RFC 1123 subdomain",
    )?;
    refuse_if(
        !is_dns_label(&pod.namespace),
        "metadata.namespace",
        "must be a lowercase RFC 1123 label",
    )?;
    refuse_if(
        !pod.uid
            .0
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "metadata.uid",
        "must contain only letters, digits and '-'",
    )
}

/// The pod-level fields, each accepted, ignored or refused.
fn validate_pod_fields(spec: &PodSpec) -> Result<(), SpecError> {
    // Destructured without `..` so that a field added by a newer Kubernetes version does
    // not compile until someone decides whether BeeMesh accepts it.
    let PodSpec {
        // Validated by their own functions.
        containers: _,
        init_containers: _,
        volumes: _,
        security_context: _,
        // Read by the plans, the placement or the agent.
        hostname,
        hostname_override,
        overhead,
        restart_policy,
        termination_grace_period_seconds: _,
        active_deadline_seconds,
        // Only the control plane acts on these (scheduling, admission, service account
        // and DNS defaults); pods from an API server carry several of them.
        affinity: _,
        automount_service_account_token: _,
        enable_service_links: _,
        eviction_responders: _,
        node_name: _,
        node_selector: _,
        preemption_policy: _,
        priority: _,
        priority_class_name: _,
        resource_claims: _,
        scheduler_name: _,
        scheduling_gates: _,
        scheduling_group: _,
        service_account: _,
        service_account_name: _,
        subdomain: _,
        tolerations: _,
        topology_spread_constraints: _,
        // Would change what runs: refused unless unset or at their default.
        dns_config,
        dns_policy,
        // Validated with the containers.
        ephemeral_containers: _,
        host_aliases,
        host_ipc,
        host_network,
        host_pid,
        host_users,
        // Their logins come with the assignment (`node::resolve`).
        image_pull_secrets: _,
        os,
        // Counted in Ready by the node, from the API's conditions (`cluster::pod_status`).
        readiness_gates: _,
        resources,
        runtime_class_name,
        set_hostname_as_fqdn,
        share_process_namespace,
    } = spec;

    // Each rule: whether the field asks for something agents cannot do, the field, why.
    let rules = [
        (
            *host_network == Some(true),
            "spec.hostNetwork",
            "host networking is not supported",
        ),
        (
            *host_pid == Some(true),
            "spec.hostPID",
            "the host's PID namespace is not supported",
        ),
        (
            *host_ipc == Some(true),
            "spec.hostIPC",
            "the host's IPC namespace is not supported",
        ),
        (
            *host_users == Some(false),
            "spec.hostUsers",
            "user namespaces are not supported yet",
        ),
        (
            *share_process_namespace == Some(true),
            "spec.shareProcessNamespace",
            "a shared process namespace is not supported yet",
        ),
        (
            active_deadline_seconds.is_some_and(|secs| secs < 1),
            "spec.activeDeadlineSeconds",
            "must be between 1 and 2147483647, inclusive",
        ),
        (
            non_empty(runtime_class_name.as_deref()).is_some(),
            "spec.runtimeClassName",
            "runtime classes are not supported",
        ),
        (
            resources.is_some(),
            "spec.resources",
            "pod-level resources are not supported yet",
        ),
        (
            *set_hostname_as_fqdn == Some(true),
            "spec.setHostnameAsFQDN",
            "setHostnameAsFQDN is not supported (there is no cluster domain)",
        ),
    ];
    for (refused, field, message) in rules {
        refuse_if(refused, field, message)?;
    }
    validate_dns(dns_policy.as_deref(), dns_config.as_ref())?;
    validate_host_aliases(host_aliases.as_deref().unwrap_or_default())?;
    validate_restart_policy(restart_policy.as_deref())?;
    if let Some(os) = os {
        validate_os(&os.name)?;
    }
    validate_hostnames(hostname.as_deref(), hostname_override.as_deref())?;
    validate_overhead(overhead.as_ref())
}

/// The API server's checks of `dnsPolicy` and `dnsConfig`, which manifests skip; they
/// also keep whitespace out of the resolv.conf the agent writes from them.
fn validate_dns(policy: Option<&str>, config: Option<&PodDNSConfig>) -> Result<(), SpecError> {
    const FIELD: &str = "spec.dnsPolicy";
    match policy {
        None | Some("ClusterFirst" | "ClusterFirstWithHostNet" | "Default") => {}
        Some("None") => {
            let nameservers = config.map(|c| c.nameservers.as_deref().unwrap_or_default());
            refuse_if(
                nameservers.is_none_or(<[String]>::is_empty),
                "spec.dnsConfig.nameservers",
                "must provide at least one DNS nameserver when `dnsPolicy` is None",
            )?;
        }
        Some(other) => {
            return Err(SpecError::new(
                FIELD,
                format!("unknown dnsPolicy \"{other}\""),
            ))
        }
    }
    let Some(config) = config else {
        return Ok(());
    };
    const PATH: &str = "spec.dnsConfig";
    let nameservers = config.nameservers.as_deref().unwrap_or_default();
    refuse_if(
        nameservers.len() > dns::MAX_NAMESERVERS,
        &format!("{PATH}.nameservers"),
        "must not have more than 3 nameservers",
    )?;
    for (i, server) in nameservers.iter().enumerate() {
        refuse_if(
            server.parse::<IpAddr>().is_err(),
            &format!("{PATH}.nameservers[{i}]"),
            "must be a valid IP address",
        )?;
    }
    let searches = config.searches.as_deref().unwrap_or_default();
    refuse_if(
        searches.len() > dns::MAX_SEARCH_PATHS,
        &format!("{PATH}.searches"),
        "must not have more than 32 search paths",
    )?;
    refuse_if(
        searches.join(" ").len() > dns::MAX_SEARCH_LIST_CHARS,
        &format!("{PATH}.searches"),
        "must not have more than 2048 characters (including spaces) in the search list",
    )?;
    for (i, search) in searches.iter().enumerate() {
        refuse_if(
            !is_dns_subdomain(search.trim_end_matches('.')),
            &format!("{PATH}.searches[{i}]"),
            "must be a lowercase RFC 1123 subdomain",
        )?;
    }
    for (i, option) in config.options.iter().flatten().enumerate() {
        let printable = |text: &str| text.chars().all(|c| c.is_ascii_graphic());
        let name = non_empty(option.name.as_deref());
        refuse_if(
            name.is_none_or(|name| !printable(name) || name.contains(':')),
            &format!("{PATH}.options[{i}].name"),
            "must be a non-empty resolver option name without spaces or ':'",
        )?;
        refuse_if(
            option.value.as_deref().is_some_and(|v| !printable(v)),
            &format!("{PATH}.options[{i}].value"),
            "must not contain spaces or control characters",
        )?;
    }
    Ok(())
}

/// The API server's checks of `hostAliases`: an IP and hostnames that are DNS subdomains
/// (which also keeps `/etc/hosts` to one entry per line).
fn validate_host_aliases(aliases: &[HostAlias]) -> Result<(), SpecError> {
    for (i, alias) in aliases.iter().enumerate() {
        let path = format!("spec.hostAliases[{i}]");
        refuse_if(
            alias.ip.parse::<IpAddr>().is_err(),
            &format!("{path}.ip"),
            "must be a valid IP address",
        )?;
        for (j, hostname) in alias.hostnames.iter().flatten().enumerate() {
            refuse_if(
                !is_dns_subdomain(hostname),
                &format!("{path}.hostnames[{j}]"),
                "must be a lowercase RFC 1123 subdomain",
            )?;
        }
    }
    Ok(())
}

fn validate_restart_policy(policy: Option<&str>) -> Result<(), SpecError> {
    match policy {
        None | Some("Always" | "OnFailure" | "Never") => Ok(()),
        Some(_) => Err(SpecError::new(
            "spec.restartPolicy",
            "must be Always, OnFailure or Never",
        )),
    }
}

fn validate_os(name: &str) -> Result<(), SpecError> {
    match name {
        "linux" => Ok(()),
        "windows" => Err(SpecError::new(
            "spec.os.name",
            "Windows pods cannot run on BeeMesh agents",
        )),
        other => Err(SpecError::new(
            "spec.os.name",
            format!("unknown operating system \"{other}\""),
        )),
    }
}

/// The kubelet refuses to start a pod whose hostname is not a valid DNS name.
fn validate_hostnames(
    hostname: Option<&str>,
    hostname_override: Option<&str>,
) -> Result<(), SpecError> {
    if let Some(hostname) = non_empty(hostname) {
        refuse_if(
            !is_dns_label(hostname),
            "spec.hostname",
            "must be a lowercase RFC 1123 label",
        )?;
    }
    if let Some(hostname) = non_empty(hostname_override) {
        refuse_if(
            hostname.len() > HOSTNAME_MAX_LEN + 1 || !is_dns_subdomain(hostname),
            "spec.hostnameOverride",
            "must be a lowercase RFC 1123 subdomain of at most 64 characters",
        )?;
    }
    Ok(())
}

/// Overhead counts in the pod's requests, so it must parse.
fn validate_overhead(overhead: Option<&BTreeMap<String, Quantity>>) -> Result<(), SpecError> {
    for (name, quantity) in overhead.into_iter().flatten() {
        if matches!(name.as_str(), "cpu" | "memory") {
            parse_resource(name, quantity)
                .map_err(|message| SpecError::new(format!("spec.overhead[{name}]"), message))?;
        }
    }
    Ok(())
}

/// The pod-level security context; runAsUser, runAsGroup and runAsNonRoot are checked per
/// container, combined with the container's own.
fn validate_pod_security(security: &PodSecurityContext) -> Result<(), SpecError> {
    const PATH: &str = "spec.securityContext";
    let PodSecurityContext {
        run_as_user,
        run_as_group,
        run_as_non_root: _,
        app_armor_profile,
        seccomp_profile,
        se_linux_options,
        windows_options,
        sysctls,
        fs_group,
        supplemental_groups,
        supplemental_groups_policy,
        fs_group_change_policy,
        // Only matters with SELinux labels, which are refused.
        se_linux_change_policy: _,
    } = security;
    validate_id(PATH, "runAsUser", *run_as_user)?;
    validate_id(PATH, "runAsGroup", *run_as_group)?;
    validate_id(PATH, "fsGroup", *fs_group)?;
    for (i, group) in supplemental_groups.iter().flatten().enumerate() {
        validate_id(PATH, &format!("supplementalGroups[{i}]"), Some(*group))?;
    }
    // A pod's volumes are new when its containers first see them, so the two policies
    // do the same here: the ownership is set once, when the agent makes them.
    match fs_group_change_policy.as_deref() {
        None | Some("Always" | "OnRootMismatch") => {}
        Some(other) => {
            return Err(SpecError::new(
                format!("{PATH}.fsGroupChangePolicy"),
                format!("unknown fsGroupChangePolicy \"{other}\""),
            ))
        }
    }
    validate_confinement(
        PATH,
        app_armor_profile.as_ref(),
        seccomp_profile.as_ref(),
        se_linux_options.as_ref(),
        windows_options.as_ref(),
    )?;
    for (i, sysctl) in sysctls.iter().flatten().enumerate() {
        refuse_if(
            !SAFE_SYSCTLS.contains(&sysctl.name.as_str()),
            &format!("{PATH}.sysctls[{i}].name"),
            &format!(
                "forbidden sysctl: \"{}\" not allowlisted (only the kubelet's safe sysctls \
                 are: {})",
                sysctl.name,
                SAFE_SYSCTLS.join(", ")
            ),
        )?;
        // Written to /proc/sys as they are: ranges are separated by spaces or tabs.
        let printable = |c: char| c.is_ascii_graphic() || c == ' ' || c == '\t';
        refuse_if(
            sysctl.value.is_empty() || !sysctl.value.chars().all(printable),
            &format!("{PATH}.sysctls[{i}].value"),
            "must be a non-empty line of printable characters",
        )?;
    }
    match supplemental_groups_policy.as_deref() {
        None | Some("Merge") => Ok(()),
        Some(_) => Err(SpecError::new(
            format!("{PATH}.supplementalGroupsPolicy"),
            "only Merge is supported",
        )),
    }
}

/// Kubernetes user and group IDs are non-negative int32 values.
fn validate_id(path: &str, field: &str, id: Option<i64>) -> Result<(), SpecError> {
    refuse_if(
        id.is_some_and(|id| !(0..=MAX_ID).contains(&id)),
        &format!("{path}.{field}"),
        "must be between 0 and 2147483647",
    )
}

/// Mandatory access control settings, shared by pod and container security contexts.
/// Values that ask for what Podman does anyway are accepted.
fn validate_confinement(
    path: &str,
    app_armor: Option<&AppArmorProfile>,
    seccomp: Option<&SeccompProfile>,
    se_linux: Option<&SELinuxOptions>,
    windows: Option<&WindowsSecurityContextOptions>,
) -> Result<(), SpecError> {
    if let Some(profile) = app_armor {
        refuse_if(
            profile.type_ != "RuntimeDefault",
            &format!("{path}.appArmorProfile"),
            "only the RuntimeDefault AppArmor profile is supported",
        )?;
    }
    if let Some(profile) = seccomp {
        refuse_if(
            !matches!(profile.type_.as_str(), "RuntimeDefault" | "Unconfined"),
            &format!("{path}.seccompProfile"),
            "only RuntimeDefault and Unconfined seccomp profiles are supported",
        )?;
    }
    refuse_if(
        se_linux.is_some_and(|options| *options != SELinuxOptions::default()),
        &format!("{path}.seLinuxOptions"),
        "SELinux options are not supported",
    )?;
    refuse_if(
        windows.is_some_and(|options| *options != WindowsSecurityContextOptions::default()),
        &format!("{path}.windowsOptions"),
        "Windows options cannot apply on BeeMesh agents",
    )
}

fn validate_volumes(volumes: &[Volume]) -> Result<(), SpecError> {
    let mut names = HashSet::new();
    for (index, volume) in volumes.iter().enumerate() {
        let path = format!("spec.volumes[{index}]");
        refuse_if(
            !is_dns_label(&volume.name),
            &format!("{path}.name"),
            "must be a lowercase RFC 1123 label",
        )?;
        refuse_if(
            !names.insert(volume.name.as_str()),
            &format!("{path}.name"),
            &format!("duplicate volume name \"{}\"", volume.name),
        )?;
        validate_volume_source(&path, volume)?;
    }
    Ok(())
}

fn validate_volume_source(path: &str, volume: &Volume) -> Result<(), SpecError> {
    let refused = volume_sources(volume)
        .into_iter()
        .find(|&(kind, set)| set && kind != "emptyDir" && !FILE_VOLUME_KINDS.contains(&kind));
    if let Some((kind, _)) = refused {
        return Err(SpecError::new(
            format!("{path}.{kind}"),
            unsupported_volume_message(kind),
        ));
    }
    // With no source at all, the API server defaults the volume to an emptyDir.
    if let Some(empty_dir) = &volume.empty_dir {
        refuse_if(
            !matches!(empty_dir.medium.as_deref(), None | Some("" | "Memory")),
            &format!("{path}.emptyDir.medium"),
            "must be \"\" or Memory",
        )?;
        refuse_if(
            empty_dir.mode.is_some(),
            &format!("{path}.emptyDir.mode"),
            "emptyDir mode is not supported yet",
        )?;
    }
    Ok(())
}

/// Volume kinds whose files the owner computes and ships with the assignment.
const FILE_VOLUME_KINDS: [&str; 4] = ["configMap", "secret", "downwardAPI", "projected"];

/// Names of the pod's volumes whose files come with the assignment (configMap, secret,
/// downwardAPI, projected); the agent writes them to `<files_dir>/<name>`.
pub fn file_volumes(pod: &Pod) -> Vec<String> {
    let volumes = pod.spec.as_ref().map(volumes_of).unwrap_or_default();
    volumes
        .iter()
        .filter(|volume| is_file_volume(volume))
        .map(|volume| volume.name.clone())
        .collect()
}

fn is_file_volume(volume: &Volume) -> bool {
    volume_sources(volume)
        .iter()
        .any(|&(kind, set)| set && FILE_VOLUME_KINDS.contains(&kind))
}

fn unsupported_volume_message(kind: &str) -> String {
    match kind {
        "hostPath" => "hostPath volumes are not allowed".to_owned(),
        "image" => format!("{kind} volumes are not supported yet"),
        _ => format!("{kind} volumes are not supported"),
    }
}

/// Every volume source with its JSON name and whether it is set.
fn volume_sources(volume: &Volume) -> [(&'static str, bool); 30] {
    // Destructured without `..`: a new volume type must not slip through unrefused.
    let Volume {
        name: _,
        aws_elastic_block_store,
        azure_disk,
        azure_file,
        cephfs,
        cinder,
        config_map,
        csi,
        downward_api,
        empty_dir,
        ephemeral,
        fc,
        flex_volume,
        flocker,
        gce_persistent_disk,
        git_repo,
        glusterfs,
        host_path,
        image,
        iscsi,
        nfs,
        persistent_volume_claim,
        photon_persistent_disk,
        portworx_volume,
        projected,
        quobyte,
        rbd,
        scale_io,
        secret,
        storageos,
        vsphere_volume,
    } = volume;
    [
        ("awsElasticBlockStore", aws_elastic_block_store.is_some()),
        ("azureDisk", azure_disk.is_some()),
        ("azureFile", azure_file.is_some()),
        ("cephfs", cephfs.is_some()),
        ("cinder", cinder.is_some()),
        ("configMap", config_map.is_some()),
        ("csi", csi.is_some()),
        ("downwardAPI", downward_api.is_some()),
        ("emptyDir", empty_dir.is_some()),
        ("ephemeral", ephemeral.is_some()),
        ("fc", fc.is_some()),
        ("flexVolume", flex_volume.is_some()),
        ("flocker", flocker.is_some()),
        ("gcePersistentDisk", gce_persistent_disk.is_some()),
        ("gitRepo", git_repo.is_some()),
        ("glusterfs", glusterfs.is_some()),
        ("hostPath", host_path.is_some()),
        ("image", image.is_some()),
        ("iscsi", iscsi.is_some()),
        ("nfs", nfs.is_some()),
        ("persistentVolumeClaim", persistent_volume_claim.is_some()),
        ("photonPersistentDisk", photon_persistent_disk.is_some()),
        ("portworxVolume", portworx_volume.is_some()),
        ("projected", projected.is_some()),
        ("quobyte", quobyte.is_some()),
        ("rbd", rbd.is_some()),
        ("scaleIO", scale_io.is_some()),
        ("secret", secret.is_some()),
        ("storageos", storageos.is_some()),
        ("vsphereVolume", vsphere_volume.is_some()),
    ]
}

fn validate_containers(spec: &PodSpec) -> Result<(), SpecError> {
    refuse_if(
        spec.containers.is_empty(),
        "spec.containers",
        "a pod needs at least one container",
    )?;
    let mut names = HashSet::new();
    let ephemeral = ephemeral_containers(spec);
    let all = all_containers(spec).chain(
        ephemeral
            .iter()
            .enumerate()
            .map(|(index, container)| (ContainerKind::Ephemeral, index, container)),
    );
    for (kind, index, container) in all {
        let path = container_path(kind, index);
        validate_container(&path, kind, container, spec)?;
        refuse_if(
            !names.insert(container.name.clone()),
            &format!("{path}.name"),
            &format!("duplicate container name \"{}\"", container.name),
        )?;
    }
    for (index, target) in ephemeral_targets(spec).iter().enumerate() {
        refuse_if(
            target
                .as_ref()
                .is_some_and(|t| !spec.containers.iter().any(|c| &c.name == t)),
            &format!("spec.ephemeralContainers[{index}].targetContainerName"),
            "must be the name of one of the pod's containers",
        )?;
    }
    validate_host_port_conflicts(spec)
}

/// The pod's ephemeral containers as containers (the API's `EphemeralContainer` has the
/// same fields, and the target's name).
pub fn ephemeral_containers(spec: &PodSpec) -> Vec<Container> {
    spec.ephemeral_containers
        .iter()
        .flatten()
        .filter_map(|e| {
            let mut value = serde_json::to_value(e).ok()?;
            value.as_object_mut()?.remove("targetContainerName");
            serde_json::from_value(value).ok()
        })
        .collect()
}

/// Each ephemeral container's `targetContainerName`, whose process namespace it joins.
pub fn ephemeral_targets(spec: &PodSpec) -> Vec<Option<String>> {
    spec.ephemeral_containers
        .iter()
        .flatten()
        .map(|e| non_empty(e.target_container_name.as_deref()).map(str::to_owned))
        .collect()
}

/// Init containers first, in the order they run, then app containers.
fn all_containers(spec: &PodSpec) -> impl Iterator<Item = (ContainerKind, usize, &Container)> {
    let init = spec.init_containers.iter().flatten().enumerate();
    let app = spec.containers.iter().enumerate();
    init.map(|(index, container)| (ContainerKind::Init, index, container))
        .chain(app.map(|(index, container)| (ContainerKind::App, index, container)))
}

fn container_path(kind: ContainerKind, index: usize) -> String {
    format!("spec.{}[{index}]", kind.spec_field())
}

fn validate_container(
    path: &str,
    kind: ContainerKind,
    container: &Container,
    spec: &PodSpec,
) -> Result<(), SpecError> {
    // Destructured without `..` for the same reason as in validate_pod_fields.
    let Container {
        name,
        image,
        image_pull_policy,
        ports,
        env,
        env_from,
        resources,
        volume_mounts,
        volume_devices,
        lifecycle,
        liveness_probe,
        readiness_probe,
        startup_probe,
        restart_policy,
        restart_policy_rules,
        security_context,
        // Used by the plans as they are.
        args: _,
        command: _,
        working_dir: _,
        stdin: _,
        stdin_once: _,
        tty: _,
        termination_message_path,
        termination_message_policy,
        // Only in-place resizing reads it.
        resize_policy: _,
    } = container;
    validate_container_name(path, name)?;
    if kind == ContainerKind::Ephemeral {
        // As the API server validates an ephemeral container: it runs only to debug.
        for (field, set) in [
            ("ports", has_items(ports.as_deref())),
            (
                "resources",
                resources.as_ref().is_some_and(|r| {
                    r.limits.as_ref().is_some_and(|l| !l.is_empty())
                        || r.requests.as_ref().is_some_and(|l| !l.is_empty())
                }),
            ),
            ("lifecycle", lifecycle.is_some()),
            ("livenessProbe", liveness_probe.is_some()),
            ("readinessProbe", readiness_probe.is_some()),
            ("startupProbe", startup_probe.is_some()),
        ] {
            refuse_if(
                set,
                &format!("{path}.{field}"),
                "may not be set for ephemeral containers",
            )?;
        }
    }
    validate_termination_message(
        path,
        termination_message_path.as_deref(),
        termination_message_policy.as_deref(),
        volume_mounts.as_deref().unwrap_or_default(),
    )?;
    validate_image(path, image.as_deref(), image_pull_policy.as_deref())?;
    validate_container_restart(path, kind, restart_policy.as_deref())?;
    refuse_if(
        has_items(restart_policy_rules.as_deref()),
        &format!("{path}.restartPolicyRules"),
        "restartPolicyRules are not supported yet",
    )?;
    // A sidecar (an init container that restarts always) may have what app containers
    // have: hooks and probes.
    let kind = if kind == ContainerKind::Init && is_sidecar(container) {
        ContainerKind::App
    } else {
        kind
    };
    if let Some(lifecycle) = lifecycle {
        validate_lifecycle(path, kind, lifecycle)?;
    }
    for (field, probe) in [
        ("livenessProbe", liveness_probe),
        ("readinessProbe", readiness_probe),
        ("startupProbe", startup_probe),
    ] {
        if let Some(probe) = probe {
            validate_probe(&format!("{path}.{field}"), kind, probe)?;
        }
    }
    validate_ports(path, ports.as_deref().unwrap_or_default())?;
    refuse_if(
        has_items(env_from.as_deref()),
        &format!("{path}.envFrom"),
        NEEDS_API,
    )?;
    validate_env(path, env.as_deref().unwrap_or_default(), container, spec)?;
    if let Some(resources) = resources {
        validate_resources(&format!("{path}.resources"), resources)?;
    }
    validate_mounts(
        path,
        volume_mounts.as_deref().unwrap_or_default(),
        volumes_of(spec),
    )?;
    refuse_if(
        has_items(volume_devices.as_deref()),
        &format!("{path}.volumeDevices"),
        "raw block volumes are not supported",
    )?;
    validate_container_security(
        path,
        spec.security_context.as_ref(),
        security_context.as_ref(),
    )
}

/// Where the container may leave its termination message: a file the agent mounts
/// there, so an absolute path that no volume is mounted at.
fn validate_termination_message(
    path: &str,
    file: Option<&str>,
    policy: Option<&str>,
    mounts: &[VolumeMount],
) -> Result<(), SpecError> {
    let field = format!("{path}.terminationMessagePath");
    let file = non_empty(file).unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH);
    refuse_if(
        !file.starts_with('/') || file == "/" || file.len() > 4096 || file.contains('\0'),
        &field,
        "must be an absolute file path",
    )?;
    refuse_if(
        Path::new(file)
            .components()
            .any(|c| c == Component::ParentDir),
        &field,
        "must not contain '..'",
    )?;
    refuse_if(
        mounts
            .iter()
            .any(|m| Path::new(&m.mount_path) == Path::new(file)),
        &field,
        "must not be the path a volume is mounted at",
    )?;
    match policy {
        None | Some("File" | "FallbackToLogsOnError") => Ok(()),
        Some(_) => Err(SpecError::new(
            format!("{path}.terminationMessagePolicy"),
            "must be File or FallbackToLogsOnError",
        )),
    }
}

/// The kubelet's safe sysctls: namespaced, and harmless to other pods. Others are
/// forbidden, as on a kubelet without `--allowed-unsafe-sysctls`.
pub const SAFE_SYSCTLS: [&str; 10] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// The API server's default `terminationMessagePath`.
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// The agent's file behind a container instance's `terminationMessagePath`, in the
/// pod's volumes directory (whose volumes are named as DNS labels, never with a dot).
pub fn termination_message_file(volumes_dir: &Path, container: &str, attempt: u32) -> PathBuf {
    volumes_dir
        .join(".termination")
        .join(format!("{container}_{attempt}"))
}

/// Whether the container's logs stand in for an empty termination message when it
/// fails (`terminationMessagePolicy: FallbackToLogsOnError`).
pub fn falls_back_to_logs(container: &Container) -> bool {
    container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
}

fn validate_container_name(path: &str, name: &str) -> Result<(), SpecError> {
    let field = format!("{path}.name");
    refuse_if(name.is_empty(), &field, "required")?;
    refuse_if(
        !is_dns_label(name),
        &field,
        "must be a lowercase RFC 1123 label",
    )
}

fn validate_image(path: &str, image: Option<&str>, policy: Option<&str>) -> Result<(), SpecError> {
    let field = format!("{path}.image");
    let image = non_empty(image).ok_or_else(|| SpecError::new(&field, "required"))?;
    refuse_if(
        image.trim() != image,
        &field,
        "must not have leading or trailing whitespace",
    )?;
    refuse_if(
        !super::is_reference_text(image),
        &field,
        "is not a valid image reference",
    )?;
    refuse_if(
        !matches!(policy, None | Some("Always" | "IfNotPresent" | "Never")),
        &format!("{path}.imagePullPolicy"),
        "must be Always, IfNotPresent or Never",
    )
}

fn validate_container_restart(
    path: &str,
    kind: ContainerKind,
    policy: Option<&str>,
) -> Result<(), SpecError> {
    let field = format!("{path}.restartPolicy");
    match (kind, policy) {
        (_, None) => Ok(()),
        (ContainerKind::Init, Some("Always")) => Ok(()),
        (ContainerKind::Init, Some(_)) => Err(SpecError::new(
            field,
            "an init container's restartPolicy may only be Always (a sidecar)",
        )),
        (ContainerKind::App, Some(_)) => Err(SpecError::new(
            field,
            "per-container restartPolicy is not supported yet",
        )),
        (ContainerKind::Ephemeral, Some(_)) => Err(SpecError::new(
            field,
            "may not be set for ephemeral containers",
        )),
    }
}

/// postStart and preStop hooks as the API server validates them: app containers only,
/// one handler each. HTTPS hooks are refused (the agent speaks HTTP only); a tcpSocket
/// hook is kept, and fails when run, as on a kubelet.
fn validate_lifecycle(
    path: &str,
    kind: ContainerKind,
    lifecycle: &Lifecycle,
) -> Result<(), SpecError> {
    let Lifecycle {
        post_start,
        pre_stop,
        stop_signal,
    } = lifecycle;
    for (name, handler) in [("postStart", post_start), ("preStop", pre_stop)] {
        let Some(handler) = handler else {
            continue;
        };
        let path = format!("{path}.lifecycle.{name}");
        refuse_if(
            kind == ContainerKind::Init,
            &path,
            "may not be set for init containers",
        )?;
        let LifecycleHandler {
            exec,
            http_get,
            sleep,
            tcp_socket,
        } = handler;
        let handlers = [
            exec.is_some(),
            http_get.is_some(),
            sleep.is_some(),
            tcp_socket.is_some(),
        ];
        refuse_if(
            handlers.iter().filter(|set| **set).count() != 1,
            &path,
            "must specify exactly one handler type",
        )?;
        refuse_if(
            http_get
                .as_ref()
                .and_then(|h| h.scheme.as_deref())
                .is_some_and(|s| s.eq_ignore_ascii_case("https")),
            &format!("{path}.httpGet.scheme"),
            "HTTPS hooks are not supported",
        )?;
        refuse_if(
            sleep.as_ref().is_some_and(|s| s.seconds < 0),
            &format!("{path}.sleep.seconds"),
            "must be greater than or equal to 0",
        )?;
    }
    refuse_if(
        stop_signal.is_some(),
        &format!("{path}.lifecycle.stopSignal"),
        "stopSignal is not supported yet",
    )
}

/// Whether an init container is a sidecar (`restartPolicy: Always`): started in order
/// with the init containers but not awaited, restarted whenever it exits, and stopped
/// after the app containers.
pub fn is_sidecar(container: &Container) -> bool {
    container.restart_policy.as_deref() == Some("Always")
}

/// The agent runs exec, httpGet and tcpSocket probes. Init containers other than
/// sidecars cannot have probes (the API server refuses them).
fn validate_probe(path: &str, kind: ContainerKind, probe: &Probe) -> Result<(), SpecError> {
    refuse_if(
        kind == ContainerKind::Init,
        path,
        "init containers may not have probes",
    )?;
    refuse_if(
        probe.grpc.is_some(),
        &format!("{path}.grpc"),
        "gRPC probes are not supported yet",
    )
}

fn validate_ports(path: &str, ports: &[ContainerPort]) -> Result<(), SpecError> {
    for (index, port) in ports.iter().enumerate() {
        let path = format!("{path}.ports[{index}]");
        refuse_if(
            !(1..=65535).contains(&port.container_port),
            &format!("{path}.containerPort"),
            "must be between 1 and 65535",
        )?;
        refuse_if(
            port.host_port
                .is_some_and(|host| !(0..=65535).contains(&host)),
            &format!("{path}.hostPort"),
            "must be between 1 and 65535 (or 0 for none)",
        )?;
        port_protocol(port)
            .map_err(|message| SpecError::new(format!("{path}.protocol"), message))?;
        if let Some(ip) = non_empty(port.host_ip.as_deref()) {
            refuse_if(
                ip.parse::<IpAddr>().is_err(),
                &format!("{path}.hostIP"),
                "must be an IP address",
            )?;
        }
    }
    Ok(())
}

fn port_protocol(port: &ContainerPort) -> Result<Protocol, String> {
    match port.protocol.as_deref() {
        None | Some("" | "TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Err("SCTP is not supported".to_owned()),
        Some(other) => Err(format!("unknown protocol \"{other}\"")),
    }
}

/// The API server refuses two app containers publishing the same host port, protocol and
/// address.
fn validate_host_port_conflicts(spec: &PodSpec) -> Result<(), SpecError> {
    let mut seen = HashSet::new();
    for (index, container) in spec.containers.iter().enumerate() {
        for (port_index, port) in container.ports.iter().flatten().enumerate() {
            let Some(mapping) = host_port_mapping(port) else {
                continue;
            };
            let key = (
                mapping.host_port,
                mapping.protocol == Protocol::Udp,
                mapping.host_ip.unwrap_or_default(),
            );
            refuse_if(
                !seen.insert(key),
                &format!("spec.containers[{index}].ports[{port_index}].hostPort"),
                &format!(
                    "host port {} is already used in this pod",
                    mapping.host_port
                ),
            )?;
        }
    }
    Ok(())
}

fn validate_env(
    path: &str,
    env: &[EnvVar],
    container: &Container,
    spec: &PodSpec,
) -> Result<(), SpecError> {
    for (index, var) in env.iter().enumerate() {
        let path = format!("{path}.env[{index}]");
        refuse_if(
            !is_env_name(&var.name),
            &format!("{path}.name"),
            "must be printable ASCII characters other than '='",
        )?;
        let Some(from) = &var.value_from else {
            continue;
        };
        let path = format!("{path}.valueFrom");
        refuse_if(
            non_empty(var.value.as_deref()).is_some(),
            &path,
            "may not be set when value is not empty",
        )?;
        // Resolving the source catches every error it could have at plan time.
        if let EnvSource::Resource(selector) = env_source(&path, from)? {
            resource_field_value(selector, spec, container)
                .map_err(|message| SpecError::new(format!("{path}.resourceFieldRef"), message))?;
        }
    }
    Ok(())
}

/// Env var names: since Kubernetes 1.34 any printable ASCII but '='.
fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'=')
}

/// Only cpu, memory and ephemeral-storage exist on an agent; requests may not exceed
/// limits, as the API server checks.
fn validate_resources(path: &str, resources: &ResourceRequirements) -> Result<(), SpecError> {
    refuse_if(
        has_items(resources.claims.as_deref()),
        &format!("{path}.claims"),
        "resource claims (dynamic resource allocation) are not supported",
    )?;
    for (section, amounts) in [
        ("limits", &resources.limits),
        ("requests", &resources.requests),
    ] {
        for (name, quantity) in amounts.iter().flatten() {
            parse_resource(name, quantity)
                .map_err(|message| SpecError::new(format!("{path}.{section}[{name}]"), message))?;
        }
    }
    for name in ["cpu", "memory", "ephemeral-storage"] {
        let amount = |amounts: &Option<BTreeMap<String, Quantity>>| {
            amounts
                .as_ref()
                .and_then(|amounts| amounts.get(name))
                .and_then(|quantity| parse_resource(name, quantity).ok())
        };
        if let (Some(request), Some(limit)) =
            (amount(&resources.requests), amount(&resources.limits))
        {
            refuse_if(
                request > limit,
                &format!("{path}.requests[{name}]"),
                &format!("must be less than or equal to the {name} limit"),
            )?;
        }
    }
    Ok(())
}

/// An amount of a resource in the unit plans use: millicores for cpu, bytes otherwise.
fn parse_resource(name: &str, quantity: &Quantity) -> Result<u64, String> {
    match name {
        "cpu" => parse_cpu_millis(quantity),
        "memory" | "ephemeral-storage" => parse_memory_bytes(quantity),
        _ => Err(format!(
            "resource {name} is not supported (only cpu, memory and ephemeral-storage)"
        )),
    }
}

fn validate_mounts(
    path: &str,
    mounts: &[VolumeMount],
    volumes: &[Volume],
) -> Result<(), SpecError> {
    let mut mount_paths = HashSet::new();
    for (index, mount) in mounts.iter().enumerate() {
        let path = format!("{path}.volumeMounts[{index}]");
        let VolumeMount {
            name,
            mount_path,
            read_only: _,
            sub_path,
            sub_path_expr,
            mount_propagation,
            recursive_read_only,
            bind_mount_options,
        } = mount;
        refuse_if(
            !volumes.iter().any(|volume| volume.name == *name),
            &format!("{path}.name"),
            &format!("no volume named \"{name}\""),
        )?;
        let field = format!("{path}.mountPath");
        refuse_if(
            !mount_path.starts_with('/'),
            &field,
            "must be an absolute path",
        )?;
        refuse_if(mount_path.contains(':'), &field, "must not contain ':'")?;
        refuse_if(
            !mount_paths.insert(mount_path.as_str()),
            &field,
            "must be unique",
        )?;
        if let Some(sub_path) = non_empty(sub_path.as_deref()) {
            validate_sub_path(sub_path)
                .map_err(|message| SpecError::new(format!("{path}.subPath"), message))?;
        }
        refuse_if(
            non_empty(sub_path_expr.as_deref()).is_some(),
            &format!("{path}.subPathExpr"),
            "subPathExpr is not supported yet",
        )?;
        refuse_if(
            !matches!(mount_propagation.as_deref(), None | Some("None")),
            &format!("{path}.mountPropagation"),
            "mount propagation is not supported",
        )?;
        // IfPossible allows a plain read-only mount, which is what the plans give.
        refuse_if(
            !matches!(
                recursive_read_only.as_deref(),
                None | Some("Disabled" | "IfPossible")
            ),
            &format!("{path}.recursiveReadOnly"),
            "recursively read-only mounts are not supported yet",
        )?;
        refuse_if(
            has_items(bind_mount_options.as_deref()),
            &format!("{path}.bindMountOptions"),
            "bindMountOptions are not supported yet",
        )?;
    }
    Ok(())
}

/// A subPath must stay inside its volume, as far as its text tells: the agent refuses
/// symbolic links in it when it mounts it.
fn validate_sub_path(sub_path: &str) -> Result<(), String> {
    let path = Path::new(sub_path);
    if path.is_absolute() {
        return Err("must be a relative path".to_owned());
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err("must not contain '..'".to_owned());
    }
    Ok(())
}

fn validate_container_security(
    path: &str,
    pod_security: Option<&PodSecurityContext>,
    security: Option<&SecurityContext>,
) -> Result<(), SpecError> {
    let path = format!("{path}.securityContext");
    if let Some(security) = security {
        let SecurityContext {
            app_armor_profile,
            proc_mount,
            run_as_group,
            run_as_user,
            se_linux_options,
            seccomp_profile,
            windows_options,
            // Combined with the pod's in effective_identity() below.
            run_as_non_root: _,
            // Carried by the plans.
            allow_privilege_escalation: _,
            capabilities: _,
            privileged: _,
            read_only_root_filesystem: _,
        } = security;
        validate_id(&path, "runAsUser", *run_as_user)?;
        validate_id(&path, "runAsGroup", *run_as_group)?;
        // As the API server's validation: Unmasked only in a user namespace (hostUsers:
        // false), which agents do not give pods yet.
        refuse_if(
            !matches!(proc_mount.as_deref(), None | Some("Default")),
            &format!("{path}.procMount"),
            "only Default is supported: Unmasked needs a user namespace (spec.hostUsers: \
             false), which is not supported yet",
        )?;
        validate_confinement(
            &path,
            app_armor_profile.as_ref(),
            seccomp_profile.as_ref(),
            se_linux_options.as_ref(),
            windows_options.as_ref(),
        )?;
    }
    let identity = effective_identity(pod_security, security);
    // The runtime cannot combine a group with the image's user (the CRI refuses it too).
    refuse_if(
        identity.uid.is_none() && identity.gid.is_some(),
        &format!("{path}.runAsGroup"),
        "runAsGroup needs runAsUser",
    )?;
    Ok(())
}

/// Whether the container must run as non-root and as the image's user, so that
/// [`verify_run_as_non_root`] needs that user.
pub fn runs_as_image_user_non_root(pod: &Pod, container: &Container) -> bool {
    let identity = container_identity(pod, container);
    identity.non_root && identity.uid.is_none()
}

/// The kubelet's `runAsNonRoot` check when it creates the container, against the user
/// the container would run as: `runAsUser` if set, else the image's (`image_user`, as
/// its configuration has it: `uid`, `name`, `uid:gid`; empty means root). The error is
/// the kubelet's, shown as `CreateContainerConfigError`.
pub fn verify_run_as_non_root(
    pod: &Pod,
    container: &Container,
    image_user: &str,
) -> Result<(), String> {
    let identity = container_identity(pod, container);
    if !identity.non_root {
        return Ok(());
    }
    // The pod was validated, so it has a name and uid.
    let pod = pod_ref(pod).map(|p| p.kubelet_name()).unwrap_or_default();
    let name = &container.name;
    if let Some(uid) = identity.uid {
        if uid == 0 {
            return Err(format!(
                "container's runAsUser breaks non-root policy (pod: \"{pod}\", container: {name})"
            ));
        }
        return Ok(());
    }
    let user = image_user.split(':').next().unwrap_or_default();
    match user.parse::<i64>() {
        Ok(uid) if uid != 0 => Ok(()),
        Err(_) if !user.is_empty() => Err(format!(
            "container has runAsNonRoot and image has non-numeric user ({user}), cannot verify \
             user is non-root (pod: \"{pod}\", container: {name})"
        )),
        // Unset, or 0.
        _ => Err(format!(
            "container has runAsNonRoot and image will run as root (pod: \"{pod}\", container: {name})"
        )),
    }
}

/// The identity container `container` of `pod` runs with, as far as the spec says.
fn container_identity(pod: &Pod, container: &Container) -> Identity {
    effective_identity(
        pod.spec.as_ref().and_then(|s| s.security_context.as_ref()),
        container.security_context.as_ref(),
    )
}

/// The user a container runs as, as the kubelet resolves it: each container field
/// overrides the pod-level one on its own.
struct Identity {
    uid: Option<i64>,
    gid: Option<i64>,
    non_root: bool,
}

fn effective_identity(
    pod: Option<&PodSecurityContext>,
    container: Option<&SecurityContext>,
) -> Identity {
    let uid = container.and_then(|c| c.run_as_user);
    let gid = container.and_then(|c| c.run_as_group);
    let non_root = container.and_then(|c| c.run_as_non_root);
    Identity {
        uid: uid.or(pod.and_then(|p| p.run_as_user)),
        gid: gid.or(pod.and_then(|p| p.run_as_group)),
        non_root: non_root.or(pod.and_then(|p| p.run_as_non_root)) == Some(true),
    }
}

/// Podman's `--user`: `uid` or `uid:gid`.
fn user_spec(identity: &Identity) -> Option<String> {
    match (identity.uid, identity.gid) {
        (Some(uid), Some(gid)) => Some(format!("{uid}:{gid}")),
        (Some(uid), None) => Some(uid.to_string()),
        // A group alone is refused by validate.
        (None, _) => None,
    }
}

// ---------------------------------------------------------------------------------------
// Env vars
// ---------------------------------------------------------------------------------------

/// Where a `valueFrom` env var takes its value.
enum EnvSource<'a> {
    Field(FieldRef<'a>),
    Resource(&'a ResourceFieldSelector),
}

/// The pod fields an env var may refer to (Kubernetes' downward API for env).
#[derive(Debug, PartialEq, Eq)]
enum FieldRef<'a> {
    Name,
    Namespace,
    Uid,
    Label(&'a str),
    Annotation(&'a str),
    NodeName,
    ServiceAccountName,
    PodIp,
    HostIp,
}

fn env_source<'a>(path: &str, from: &'a EnvVarSource) -> Result<EnvSource<'a>, SpecError> {
    let EnvVarSource {
        config_map_key_ref,
        field_ref,
        file_key_ref,
        resource_field_ref,
        secret_key_ref,
    } = from;
    let set = [
        config_map_key_ref.is_some(),
        field_ref.is_some(),
        file_key_ref.is_some(),
        resource_field_ref.is_some(),
        secret_key_ref.is_some(),
    ];
    refuse_if(
        set.into_iter().filter(|&set| set).count() != 1,
        path,
        "must have exactly one source",
    )?;
    refuse_if(
        config_map_key_ref.is_some(),
        &format!("{path}.configMapKeyRef"),
        NEEDS_API,
    )?;
    refuse_if(
        secret_key_ref.is_some(),
        &format!("{path}.secretKeyRef"),
        NEEDS_API,
    )?;
    refuse_if(
        file_key_ref.is_some(),
        &format!("{path}.fileKeyRef"),
        "fileKeyRef is not supported yet",
    )?;
    match (field_ref, resource_field_ref) {
        (Some(selector), _) => parse_field_ref(selector)
            .map(EnvSource::Field)
            .map_err(|message| SpecError::new(format!("{path}.fieldRef"), message)),
        (None, Some(selector)) => Ok(EnvSource::Resource(selector)),
        // Exactly one source is set and the others were refused above.
        (None, None) => Err(SpecError::new(path, "must have exactly one source")),
    }
}

/// Whether a container's environment refers to the pod's IP, which must then be known
/// before that container is created.
pub fn env_uses_pod_ip(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.env.iter().flatten())
        .filter_map(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .any(|selector| parse_field_ref(selector) == Ok(FieldRef::PodIp))
}

fn parse_field_ref(selector: &ObjectFieldSelector) -> Result<FieldRef<'_>, String> {
    if !matches!(
        non_empty(selector.api_version.as_deref()),
        None | Some("v1")
    ) {
        return Err("apiVersion must be v1".to_owned());
    }
    let path = selector.field_path.as_str();
    // `metadata.labels['key']`, split as the kubelet's SplitMaybeSubscriptedPath does.
    if let Some((base, key)) = path
        .strip_suffix("']")
        .and_then(|path| path.split_once("['"))
    {
        return match base {
            "metadata.labels" if !key.is_empty() => Ok(FieldRef::Label(key)),
            "metadata.annotations" if !key.is_empty() => Ok(FieldRef::Annotation(key)),
            _ => Err(format!("unsupported fieldPath \"{path}\"")),
        };
    }
    match path {
        "metadata.name" => Ok(FieldRef::Name),
        "metadata.namespace" => Ok(FieldRef::Namespace),
        "metadata.uid" => Ok(FieldRef::Uid),
        "spec.nodeName" => Ok(FieldRef::NodeName),
        "spec.serviceAccountName" => Ok(FieldRef::ServiceAccountName),
        // A pod and an agent have one address each, so the lists hold one entry.
        "status.podIP" | "status.podIPs" => Ok(FieldRef::PodIp),
        "status.hostIP" | "status.hostIPs" => Ok(FieldRef::HostIp),
        _ => Err(format!("unsupported fieldPath \"{path}\"")),
    }
}

fn field_value(field: &FieldRef, pod: &Pod, pod_ref: &PodRef, ctx: &PlanContext) -> String {
    let ip = |ip: Option<IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
    let meta_entry = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|map| map.get(key))
            .cloned()
            .unwrap_or_default()
    };
    match field {
        FieldRef::Name => pod_ref.name.clone(),
        FieldRef::Namespace => pod_ref.namespace.clone(),
        FieldRef::Uid => pod_ref.uid.0.clone(),
        FieldRef::Label(key) => meta_entry(&pod.metadata.labels, key),
        FieldRef::Annotation(key) => meta_entry(&pod.metadata.annotations, key),
        // The Kubernetes node the pod is bound to, else the agent's own name.
        FieldRef::NodeName => pod
            .spec
            .as_ref()
            .and_then(|spec| non_empty(spec.node_name.as_deref()))
            .unwrap_or(ctx.node_name)
            .to_owned(),
        FieldRef::ServiceAccountName => pod
            .spec
            .as_ref()
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_default(),
        FieldRef::PodIp => ip(ctx.pod_ip),
        FieldRef::HostIp => ip(ctx.host_ip),
    }
}

/// A container's request or limit as an env value, as the kubelet computes it: the amount
/// divided by the divisor (default 1), rounded up.
/// A downwardAPI volume item's `resourceFieldRef`, which must name its container.
pub fn volume_resource_field(
    selector: &ResourceFieldSelector,
    spec: &PodSpec,
) -> Result<String, String> {
    let name = non_empty(selector.container_name.as_deref())
        .ok_or_else(|| "containerName is required in volumes".to_owned())?;
    let container =
        find_container(spec, name).ok_or_else(|| format!("no container named \"{name}\""))?;
    resource_field_value(selector, spec, container)
}

fn resource_field_value(
    selector: &ResourceFieldSelector,
    spec: &PodSpec,
    container: &Container,
) -> Result<String, String> {
    let target = match non_empty(selector.container_name.as_deref()) {
        None => container,
        Some(name) => {
            find_container(spec, name).ok_or_else(|| format!("no container named \"{name}\""))?
        }
    };
    let (section, name) = match selector.resource.split_once('.') {
        Some((section @ ("limits" | "requests"), name @ ("cpu" | "memory"))) => (section, name),
        _ => {
            return Err(format!(
                "resource \"{}\" is not supported (only limits.cpu, limits.memory, \
                 requests.cpu and requests.memory)",
                selector.resource
            ))
        }
    };
    let resources = target.resources.as_ref();
    let quantity = if section == "limits" {
        let limit = resources.and_then(|r| r.limits.as_ref()?.get(name));
        // The kubelet would use the node's allocatable amount, which plans lack.
        Some(limit.ok_or_else(|| {
            format!(
                "container \"{}\" has no {name} limit; defaulting it to the agent's capacity \
                 is not supported yet",
                target.name
            )
        })?)
    } else {
        effective_request(resources, name)
    };
    let parse = |quantity| parse_resource(name, quantity);
    let value = quantity.map(parse).transpose()?.unwrap_or(0);
    // A zero or absent divisor means 1: 1000 millicores for cpu, 1 byte for memory.
    let one = if name == "cpu" { 1000 } else { 1 };
    let divisor = selector.divisor.as_ref().map(parse).transpose()?;
    let divisor = divisor.filter(|&divisor| divisor != 0).unwrap_or(one);
    Ok(value.div_ceil(divisor).to_string())
}

/// Looks a container up by name, app containers first as the kubelet does.
fn find_container<'a>(spec: &'a PodSpec, name: &str) -> Option<&'a Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|container| container.name == name)
}

/// The container's env as the kubelet builds it: in order, each value expanded against
/// the vars defined before it; a later definition of a name replaces the earlier value.
fn container_env(
    path: &str,
    pod: &Pod,
    pod_ref: &PodRef,
    spec: &PodSpec,
    container: &Container,
    ctx: &PlanContext,
) -> Result<Vec<(String, String)>, SpecError> {
    let mut env: Vec<(String, String)> = Vec::new();
    for (index, var) in container.env.iter().flatten().enumerate() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or_default(), |name| {
                env_lookup(&env, name)
            }),
            Some(from) => {
                let path = format!("{path}.env[{index}].valueFrom");
                match env_source(&path, from)? {
                    EnvSource::Field(field) => field_value(&field, pod, pod_ref, ctx),
                    EnvSource::Resource(selector) => {
                        resource_field_value(selector, spec, container).map_err(|message| {
                            SpecError::new(format!("{path}.resourceFieldRef"), message)
                        })?
                    }
                }
            }
        };
        match env.iter_mut().find(|(name, _)| *name == var.name) {
            Some(entry) => entry.1 = value,
            None => env.push((var.name.clone(), value)),
        }
    }
    Ok(env)
}

fn env_lookup<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
    env.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// Kubernetes' `$(VAR)` expansion: `$(NAME)` becomes the value of NAME, or stays as it is
/// when NAME is unknown; `$$` is a literal `$`; any other `$` is kept.
fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some((before, after)) = rest.split_once('$') {
        out.push_str(before);
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.split_once(')') {
                Some((name, tail)) => {
                    match lookup(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = tail;
                }
                // An unclosed reference is kept, and the text after it still expanded.
                None => {
                    out.push_str("$(");
                    rest = body;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// `command` or `args` expanded against the container's whole env; an empty list means
/// "not set", as for the kubelet.
fn expand_list(list: Option<&[String]>, env: &[(String, String)]) -> Option<Vec<String>> {
    let list = list.filter(|list| !list.is_empty())?;
    Some(
        list.iter()
            .map(|item| expand(item, |name| env_lookup(env, name)))
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------
// Plans
// ---------------------------------------------------------------------------------------

/// The Podman pod for a Kubernetes pod: its name, hostname, labels, host ports, resolver
/// configuration and `/etc/hosts` entries.
pub fn pod_plan(pod: &Pod, ctx: &PlanContext) -> Result<PodPlan, SpecError> {
    validate(pod)?;
    let pod_ref = pod_ref(pod)?;
    let spec = spec_of(pod)?;
    let pod_dns = dns::pod_dns(spec, &pod_ref.namespace, ctx.host_dns, ctx.cluster_dns);
    Ok(PodPlan {
        dns: pod_dns.resolv,
        dns_warnings: pod_dns.warnings,
        memory_volumes: memory_volumes(pod, ctx.epoch)?,
        host_aliases: spec
            .host_aliases
            .iter()
            .flatten()
            .filter_map(|alias| {
                let ip = alias.ip.parse::<IpAddr>().ok()?;
                Some(
                    alias
                        .hostnames
                        .iter()
                        .flatten()
                        .map(move |h| (h.clone(), ip)),
                )
            })
            .flatten()
            .collect(),
        name: podman_pod_name(&pod_ref, ctx.epoch),
        network: ctx.pod_subnet.map(PodNetwork::on),
        hostname: pod_hostname(&pod_ref, spec),
        labels: pod_labels(&pod_ref, ctx),
        ports: running_containers(spec)
            .flat_map(|container| container.ports.iter().flatten())
            .filter_map(host_port_mapping)
            .collect(),
    })
}

/// The containers that run alongside each other: sidecars and app containers (whose
/// host ports the pod binds).
fn running_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .filter(|c| is_sidecar(c))
        .chain(&spec.containers)
}

/// The kubelet's hostname: hostnameOverride, else hostname, else the pod name, cut to 63
/// characters without a trailing '-' or '.'.
fn pod_hostname(pod: &PodRef, spec: &PodSpec) -> String {
    let wanted = non_empty(spec.hostname_override.as_deref())
        .or(non_empty(spec.hostname.as_deref()))
        .unwrap_or(&pod.name);
    if wanted.len() <= HOSTNAME_MAX_LEN {
        return wanted.to_owned();
    }
    let truncated: String = wanted.chars().take(HOSTNAME_MAX_LEN).collect();
    truncated.trim_end_matches(['-', '.']).to_owned()
}

/// The host port a container port publishes, if any (hostPort 0 or unset means none).
fn host_port_mapping(port: &ContainerPort) -> Option<PortMapping> {
    Some(PortMapping {
        container_port: u16::try_from(port.container_port).ok()?,
        host_port: u16::try_from(port.host_port?).ok().filter(|&p| p != 0)?,
        host_ip: non_empty(port.host_ip.as_deref()).map(str::to_owned),
        protocol: port_protocol(port).ok()?,
    })
}

/// One instance of a container of the pod. `attempt` is 0 for the first instance and
/// grows by one for each restart.
pub fn container_plan(
    pod: &Pod,
    container: &Container,
    kind: ContainerKind,
    attempt: u32,
    ctx: &PlanContext,
) -> Result<ContainerPlan, SpecError> {
    validate(pod)?;
    let pod_ref = pod_ref(pod)?;
    let spec = spec_of(pod)?;
    // The container must be the pod's, so that validate has checked it.
    let path = locate_container(spec, container, kind)?;
    let mut env = container_env(&path, pod, &pod_ref, spec, container, ctx)?;
    let mut mounts = container_mounts(container, spec, ctx);
    if let Some(dir) = ctx.group_socket_dir {
        mounts.push(Mount {
            volume: "beemesh-group".into(),
            volume_dir: dir.to_owned(),
            sub_path: None,
            container_path: crate::raft::SOCKET_DIR_IN_CONTAINER.into(),
            read_only: false,
        });
        env.push((
            crate::raft::SOCKET_ENV.into(),
            crate::raft::SOCKET_IN_CONTAINER.into(),
        ));
    }
    let limit = |name: &str| {
        let quantity = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref()?.get(name));
        quantity
            .map(|q| parse_resource(name, q))
            .transpose()
            .map_err(|message| SpecError::new(format!("{path}.resources.limits[{name}]"), message))
    };
    let security = container.security_context.as_ref();
    let pod_name = podman_pod_name(&pod_ref, ctx.epoch);

    let mut labels = pod_labels(&pod_ref, ctx);
    labels.insert(labels::CONTAINER.to_owned(), container.name.clone());
    labels.insert(labels::CONTAINER_KIND.to_owned(), kind.label().to_owned());
    labels.insert(labels::ATTEMPT.to_owned(), attempt.to_string());

    Ok(ContainerPlan {
        name: format!("{pod_name}_{}_{attempt}", container.name),
        image: container.image.clone().unwrap_or_default(),
        pull_policy: pull_policy(container),
        command: expand_list(container.command.as_deref(), &env),
        args: expand_list(container.args.as_deref(), &env),
        working_dir: non_empty(container.working_dir.as_deref()).map(str::to_owned),
        memory_limit_bytes: limit("memory")?,
        cpu_limit_millis: limit("cpu")?,
        mounts,
        termination_message: TerminationMessage {
            host_file: termination_message_file(ctx.volumes_dir, &container.name, attempt),
            container_path: non_empty(container.termination_message_path.as_deref())
                .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH)
                .to_owned(),
        },
        labels,
        tty: container.tty == Some(true),
        stdin: container.stdin == Some(true),
        stdin_once: container.stdin_once == Some(true),
        user: user_spec(&effective_identity(
            spec.security_context.as_ref(),
            security,
        )),
        privileged: security.and_then(|s| s.privileged) == Some(true),
        read_only_root_fs: security.and_then(|s| s.read_only_root_filesystem) == Some(true),
        no_new_privileges: security.and_then(|s| s.allow_privilege_escalation) == Some(false),
        cap_add: capability_names(security, |c| c.add.as_deref()),
        cap_drop: capability_names(security, |c| c.drop.as_deref()),
        supplemental_groups: supplemental_groups(spec),
        // Set by every container: they share the pod's network and IPC namespaces.
        sysctls: spec
            .security_context
            .iter()
            .flat_map(|security| security.sysctls.iter().flatten())
            .map(|sysctl| (sysctl.name.clone(), sysctl.value.clone()))
            .collect(),
        stop_timeout_secs: grace_period_secs(pod),
        // The target's runtime ID is the agent's to fill in.
        pid_namespace_of: None,
        env,
    })
}

/// The groups every container's process gets besides its own, as the kubelet gives
/// them: `supplementalGroups`, then `fsGroup` (which owns the pod's volumes).
fn supplemental_groups(spec: &PodSpec) -> Vec<u32> {
    let Some(security) = &spec.security_context else {
        return Vec::new();
    };
    let mut groups: Vec<u32> = Vec::new();
    let listed = security.supplemental_groups.iter().flatten().copied();
    for group in listed.chain(security.fs_group) {
        // Validated as 0..=i32::MAX.
        if let Ok(group) = u32::try_from(group) {
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
    }
    groups
}

/// The pod's `fsGroup`: the group the agent gives its volumes.
pub fn fs_group(pod: &Pod) -> Option<u32> {
    let group = pod.spec.as_ref()?.security_context.as_ref()?.fs_group?;
    u32::try_from(group).ok()
}

fn capability_names(
    security: Option<&SecurityContext>,
    list: impl Fn(&k8s_openapi::api::core::v1::Capabilities) -> Option<&[String]>,
) -> Vec<String> {
    security
        .and_then(|s| s.capabilities.as_ref())
        .and_then(list)
        .map(<[String]>::to_vec)
        .unwrap_or_default()
}

/// The field path of `container` in the pod, or an error if the pod has no such
/// container of that kind.
fn locate_container(
    spec: &PodSpec,
    container: &Container,
    kind: ContainerKind,
) -> Result<String, SpecError> {
    let ephemeral;
    let list = match kind {
        ContainerKind::Init => spec.init_containers.as_deref().unwrap_or_default(),
        ContainerKind::App => spec.containers.as_slice(),
        ContainerKind::Ephemeral => {
            ephemeral = ephemeral_containers(spec);
            ephemeral.as_slice()
        }
    };
    list.iter()
        .position(|c| c == container)
        .map(|index| container_path(kind, index))
        .ok_or_else(|| {
            SpecError::new(
                format!("spec.{}", kind.spec_field()),
                format!("the pod has no such container \"{}\"", container.name),
            )
        })
}

/// Bind mounts of the container's volumes: emptyDirs under `volumes_dir`, volumes of
/// files from the API under `files_dir`, always read-only, as the kubelet mounts them.
fn container_mounts(container: &Container, spec: &PodSpec, ctx: &PlanContext) -> Vec<Mount> {
    let file_volumes: HashSet<&str> = volumes_of(spec)
        .iter()
        .filter(|volume| is_file_volume(volume))
        .map(|volume| volume.name.as_str())
        .collect();
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|mount| {
            let is_file_volume = file_volumes.contains(mount.name.as_str());
            let volume_dir = if is_file_volume {
                ctx.files_dir.join(&mount.name)
            } else if let Some(dir) = ctx.memory_dirs.get(&mount.name) {
                dir.clone()
            } else {
                ctx.volumes_dir.join(&mount.name)
            };
            Mount {
                volume: mount.name.clone(),
                volume_dir,
                sub_path: non_empty(mount.sub_path.as_deref()).and_then(normal_sub_path),
                container_path: mount.mount_path.clone(),
                read_only: mount.read_only == Some(true) || is_file_volume,
            }
        })
        .collect()
}

/// A validated subPath as the plain names it walks through (`./a//b/` is `a/b`); None when
/// it names the volume itself (`.`).
fn normal_sub_path(sub_path: &str) -> Option<PathBuf> {
    let names: PathBuf = Path::new(sub_path)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    (!names.as_os_str().is_empty()).then_some(names)
}

/// The image pull policy, defaulted as the API server does: Always for an image without a
/// tag and digest, or tagged `latest`; IfNotPresent otherwise.
pub fn pull_policy(container: &Container) -> PullPolicy {
    match container.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        Some("Never") => PullPolicy::Never,
        _ => {
            let image = container.image.as_deref().unwrap_or_default();
            let (name, digest) = match image.split_once('@') {
                Some((name, _)) => (name, true),
                None => (image, false),
            };
            match image_tag(name) {
                Some("latest") => PullPolicy::Always,
                None if !digest => PullPolicy::Always,
                _ => PullPolicy::IfNotPresent,
            }
        }
    }
}

/// The tag of an image reference without digest: after the last ':' of the last path
/// component, so that a registry port (`localhost:5000/busybox`) is not taken for a tag.
fn image_tag(name: &str) -> Option<&str> {
    let last_component = name.rsplit_once('/').map_or(name, |(_, last)| last);
    last_component.rsplit_once(':').map(|(_, tag)| tag)
}

// ---------------------------------------------------------------------------------------
// Placement facts
// ---------------------------------------------------------------------------------------

/// What the pod needs from an agent, as the scheduler counts it: the larger of the sum of
/// the app containers' and sidecars' requests and the largest init container request
/// (with the sidecars started before it), per resource, plus the pod overhead; a
/// container with a limit but no request requests its limit.
pub fn pod_requests(pod: &Pod) -> Result<Resources, SpecError> {
    let spec = spec_of(pod)?;
    let mut apps = Resources::default();
    let mut sidecars = Resources::default();
    let mut init = Resources::default();
    for (kind, index, container) in all_containers(spec) {
        let requests = container_requests(&container_path(kind, index), container)?;
        match kind {
            ContainerKind::App => apps = apps.saturating_add(requests),
            ContainerKind::Init if is_sidecar(container) => {
                sidecars = sidecars.saturating_add(requests);
                init = max_each(init, sidecars);
            }
            ContainerKind::Init => init = max_each(init, sidecars.saturating_add(requests)),
            // They have no resources (the API refuses them).
            ContainerKind::Ephemeral => {}
        }
    }
    let apps = apps.saturating_add(sidecars);
    let overhead = |name: &str| {
        let quantity = spec.overhead.as_ref().and_then(|amounts| amounts.get(name));
        amount_or_zero("spec.overhead", name, quantity)
    };
    let overhead = Resources {
        cpu_millis: overhead("cpu")?,
        memory_bytes: overhead("memory")?,
        pods: 0,
    };
    let pod = Resources {
        pods: 1,
        ..max_each(apps, init)
    };
    Ok(pod.saturating_add(overhead))
}

fn container_requests(path: &str, container: &Container) -> Result<Resources, SpecError> {
    let field = format!("{path}.resources.requests");
    let amount = |name: &str| {
        let quantity = effective_request(container.resources.as_ref(), name);
        amount_or_zero(&field, name, quantity)
    };
    Ok(Resources {
        cpu_millis: amount("cpu")?,
        memory_bytes: amount("memory")?,
        pods: 0,
    })
}

/// A resource amount in plan units, 0 when absent; errors name `<field>[<name>]`.
fn amount_or_zero(field: &str, name: &str, quantity: Option<&Quantity>) -> Result<u64, SpecError> {
    quantity.map_or(Ok(0), |quantity| {
        parse_resource(name, quantity)
            .map_err(|message| SpecError::new(format!("{field}[{name}]"), message))
    })
}

/// A container's request for a resource, defaulted to its limit as the API server does.
fn effective_request<'a>(
    resources: Option<&'a ResourceRequirements>,
    name: &str,
) -> Option<&'a Quantity> {
    let resources = resources?;
    let get = |amounts: &'a Option<BTreeMap<String, Quantity>>| amounts.as_ref()?.get(name);
    get(&resources.requests).or_else(|| get(&resources.limits))
}

fn max_each(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_millis: a.cpu_millis.max(b.cpu_millis),
        memory_bytes: a.memory_bytes.max(b.memory_bytes),
        pods: a.pods.max(b.pods),
    }
}

/// The host ports the pod binds (any protocol), sorted, each once.
pub fn host_ports(pod: &Pod) -> Vec<u16> {
    let mut ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(running_containers)
        .flat_map(|container| container.ports.iter().flatten())
        .filter_map(host_port_mapping)
        .map(|mapping| mapping.host_port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Names of the pod's emptyDir volumes on disk, including volumes without any source,
/// which the API server defaults to emptyDir. The agent creates `<volumes_dir>/<name>`
/// for each.
pub fn empty_dirs(pod: &Pod) -> Vec<String> {
    let volumes = pod.spec.as_ref().map(volumes_of).unwrap_or_default();
    volumes
        .iter()
        .filter(|volume| match &volume.empty_dir {
            Some(empty_dir) => empty_dir.medium.as_deref() != Some("Memory"),
            None => volume_sources(volume).iter().all(|&(_, set)| !set),
        })
        .map(|volume| volume.name.clone())
        .collect()
}

/// The pod's emptyDirs with `medium: Memory`: tmpfs volumes the runtime makes for the
/// pod's sandbox, named `<Podman pod name>_<volume>`, as large as the kubelet makes them:
/// the `sizeLimit`, else the pod's memory limit when each of its containers has one,
/// else the tmpfs default (half the agent's memory).
pub fn memory_volumes(pod: &Pod, epoch: Epoch) -> Result<Vec<MemoryVolume>, SpecError> {
    let spec = spec_of(pod)?;
    let pod_ref = pod_ref(pod)?;
    let pod_limit = pod_memory_limit(spec)?;
    let group = fs_group(pod);
    let mut out = Vec::new();
    for (index, volume) in volumes_of(spec).iter().enumerate() {
        let Some(empty_dir) = volume
            .empty_dir
            .as_ref()
            .filter(|e| e.medium.as_deref() == Some("Memory"))
        else {
            continue;
        };
        let size_limit = empty_dir
            .size_limit
            .as_ref()
            .map(|q| {
                parse_memory_bytes(q).map_err(|e| {
                    SpecError::new(format!("spec.volumes[{index}].emptyDir.sizeLimit"), e)
                })
            })
            .transpose()?;
        out.push(MemoryVolume {
            name: volume.name.clone(),
            volume: format!("{}_{}", podman_pod_name(&pod_ref, epoch), volume.name),
            size_bytes: match (size_limit, pod_limit) {
                (Some(size), Some(limit)) => Some(size.min(limit)),
                (size, limit) => size.or(limit),
            },
            group,
        });
    }
    Ok(out)
}

/// The sum of the app containers' memory limits, when every one has a limit.
fn pod_memory_limit(spec: &PodSpec) -> Result<Option<u64>, SpecError> {
    let mut total = 0u64;
    for (index, container) in spec.containers.iter().enumerate() {
        let limit = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|limits| limits.get("memory"));
        let Some(limit) = limit else {
            return Ok(None);
        };
        let bytes = parse_memory_bytes(limit).map_err(|e| {
            SpecError::new(
                format!("spec.containers[{index}].resources.limits[memory]"),
                e,
            )
        })?;
        total = total.saturating_add(bytes);
    }
    Ok((!spec.containers.is_empty()).then_some(total))
}

/// Seconds between SIGTERM and SIGKILL when stopping the pod's containers, as the
/// kubelet's killContainer computes it: deletionGracePeriodSeconds if the deletion set
/// one, else terminationGracePeriodSeconds, else 30; never less than 2 seconds (so 0 or a
/// negative value give 2).
pub fn grace_period_secs(pod: &Pod) -> u64 {
    let requested = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref()?.termination_grace_period_seconds)
        .unwrap_or(DEFAULT_GRACE_PERIOD_SECS);
    requested.max(MIN_GRACE_PERIOD_SECS).unsigned_abs()
}

// ---------------------------------------------------------------------------------------
// Quantities
// ---------------------------------------------------------------------------------------

/// A CPU quantity in millicores, rounded up as Kubernetes' MilliValue does (0.0001 → 1m).
pub fn parse_cpu_millis(q: &Quantity) -> Result<u64, String> {
    parse_scaled(q, 3)
}

/// A memory (or storage) quantity in bytes, rounded up to a whole byte.
pub fn parse_memory_bytes(q: &Quantity) -> Result<u64, String> {
    parse_scaled(q, 0)
}

fn parse_scaled(q: &Quantity, exp10: i64) -> Result<u64, String> {
    parse_quantity(&q.0)?
        .ceil_scaled(exp10)
        .ok_or_else(|| format!("\"{}\" is too large", q.0))
}

/// More significant digits than a u128 holds; no real quantity has that many.
const MAX_SIGNIFICANT_DIGITS: usize = 38;

/// An exact, non-negative quantity: `mantissa × 10^exp10 × 2^exp2`.
#[derive(Debug)]
struct Amount {
    mantissa: u128,
    exp10: i64,
    exp2: u32,
}

/// Parses Kubernetes' quantity syntax: an optionally signed decimal number ("1", "0.5",
/// ".5", "2.") followed by a binary suffix (Ki … Ei), a decimal suffix (n u m "" k M G
/// T P E) or an exponent ("1e3", "12E6"; "E" alone is exa). Negative amounts are refused.
fn parse_quantity(text: &str) -> Result<Amount, String> {
    let invalid = || format!("\"{text}\" is not a valid quantity");
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let number_len = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_len);
    let (int_digits, frac_digits) = number.split_once('.').unwrap_or((number, ""));
    if frac_digits.contains('.') || (int_digits.is_empty() && frac_digits.is_empty()) {
        return Err(invalid());
    }
    let suffix_exp10 = suffix_exponents(suffix).ok_or_else(invalid)?;

    let digits = format!("{int_digits}{frac_digits}");
    let significant = digits.trim_start_matches('0');
    let trimmed = significant.trim_end_matches('0');
    if trimmed.len() > MAX_SIGNIFICANT_DIGITS {
        return Err(format!("\"{text}\" has too many significant digits"));
    }
    let mantissa: u128 = if trimmed.is_empty() {
        0
    } else {
        trimmed.parse().map_err(|_| invalid())?
    };
    if negative && mantissa != 0 {
        return Err(format!("\"{text}\" is negative"));
    }
    let out_of_range = || format!("\"{text}\" has an exponent out of range");
    let trailing_zeros = i64::try_from(significant.len() - trimmed.len()).map_err(|_| invalid())?;
    let frac_len = i64::try_from(frac_digits.len()).map_err(|_| invalid())?;
    let exp10 = suffix_exp10
        .0
        .checked_add(trailing_zeros)
        .and_then(|exp| exp.checked_sub(frac_len))
        .ok_or_else(out_of_range)?;
    Ok(Amount {
        mantissa,
        exp10,
        exp2: suffix_exp10.1,
    })
}

/// The powers of ten and of two a suffix stands for.
fn suffix_exponents(suffix: &str) -> Option<(i64, u32)> {
    let exponents = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            (exponent.parse().ok()?, 0)
        }
    };
    Some(exponents)
}

impl Amount {
    /// The amount times 10^scale, rounded up to an integer; None if it exceeds u64.
    fn ceil_scaled(&self, scale: i64) -> Option<u64> {
        if self.mantissa == 0 {
            return Some(0);
        }
        let base = self.mantissa.checked_mul(1u128 << self.exp2)?;
        let exp10 = self.exp10.saturating_add(scale);
        let power = |exp: u64| {
            u32::try_from(exp)
                .ok()
                .and_then(|exp| 10u128.checked_pow(exp))
        };
        let value = if exp10 >= 0 {
            base.checked_mul(power(exp10.unsigned_abs())?)?
        } else {
            match power(exp10.unsigned_abs()) {
                Some(divisor) => base.div_ceil(divisor),
                // 10^k beyond u128 exceeds any base: a positive amount under 1 rounds to 1.
                None => 1,
            }
        };
        u64::try_from(value).ok()
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

fn refuse_if(condition: bool, field: &str, message: &str) -> Result<(), SpecError> {
    if condition {
        Err(SpecError::new(field, message))
    } else {
        Ok(())
    }
}

/// Kubernetes treats an empty string like an unset field.
fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|value| !value.is_empty())
}

/// Kubernetes treats an empty list like an unset field.
fn has_items<T>(list: Option<&[T]>) -> bool {
    list.is_some_and(|list| !list.is_empty())
}

/// An RFC 1123 label: at most 63 lowercase letters, digits and '-', starting and ending
/// with a letter or digit.
pub fn is_dns_label(text: &str) -> bool {
    text.len() <= 63 && is_label_chars(text)
}

/// An RFC 1123 subdomain: at most 253 characters of dot-separated labels.
pub fn is_dns_subdomain(text: &str) -> bool {
    text.len() <= 253 && text.split('.').all(is_label_chars)
}

fn is_label_chars(text: &str) -> bool {
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = text.as_bytes();
    bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
        && bytes.iter().all(|b| alphanumeric(b) || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::path::PathBuf;

    const UID: &str = "5f3a9c1e-7b2d-4c1a-9e8f-0123456789ab";

    /// A small valid pod; tests change it with [`pod_with`].
    fn base() -> Value {
        json!({
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": UID,
                "labels": {"app": "web"},
                "annotations": {"team": "blue"}
            },
            "spec": {
                "containers": [{"name": "main", "image": "nginx:1.25"}]
            }
        })
    }

    /// Sets the value at a JSON pointer, creating missing objects on the way.
    fn set(target: &mut Value, pointer: &str, value: Value) {
        let segments: Vec<&str> = pointer.trim_start_matches('/').split('/').collect();
        let (last, parents) = segments.split_last().expect("non-empty pointer");
        let mut current = target;
        for segment in parents {
            current = match current {
                Value::Array(items) => &mut items[segment.parse::<usize>().expect("index")],
                Value::Object(map) => map.entry(segment.to_string()).or_insert_with(|| json!({})),
                other => panic!("cannot descend into {other}"),
            };
        }
        match current {
            Value::Array(items) => items[last.parse::<usize>().expect("index")] = value,
            Value::Object(map) => {
                map.insert(last.to_string(), value);
            }
            other => panic!("cannot set a field of {other}"),
        }
    }

    fn pod_with(changes: &[(&str, Value)]) -> Pod {
        let mut pod = base();
        for (pointer, value) in changes {
            set(&mut pod, pointer, value.clone());
        }
        serde_json::from_value(pod).expect("pod JSON")
    }

    /// Where the tests' volumes of files live.
    const FILES_DIR: &str = "/run/beemesh/files/p";

    /// The agent's resolv.conf in these tests.
    static HOST_DNS: std::sync::LazyLock<dns::ResolvConf> = std::sync::LazyLock::new(|| {
        dns::parse_resolv_conf("nameserver 10.0.0.2\nsearch corp.example\noptions edns0\n")
    });

    fn context(volumes_dir: &Path) -> PlanContext<'_> {
        PlanContext {
            agent: "agent-peer",
            owner: "owner-peer",
            epoch: Epoch(3),
            volumes_dir,
            files_dir: Path::new(FILES_DIR),
            pod_ip: None,
            host_ip: None,
            pod_subnet: None,
            cluster_dns: None,
            node_name: "beemesh-node",
            host_dns: &HOST_DNS,
            memory_dirs: &NO_MEMORY_DIRS,
            group_socket_dir: None,
        }
    }

    static NO_MEMORY_DIRS: BTreeMap<String, PathBuf> = BTreeMap::new();

    fn app(pod: &Pod, index: usize) -> &Container {
        &pod.spec.as_ref().expect("spec").containers[index]
    }

    fn app_plan(pod: &Pod, ctx: &PlanContext) -> ContainerPlan {
        container_plan(pod, app(pod, 0), ContainerKind::App, 0, ctx).expect("container plan")
    }

    fn quantity(text: &str) -> Quantity {
        Quantity(text.to_owned())
    }

    #[test]
    fn cpu_quantities_round_up_to_millicores() {
        let cases = [
            ("1", 1000),
            ("0.5", 500),
            ("2.25", 2250),
            ("100m", 100),
            ("0.0001", 1),
            ("1.0001", 1001),
            ("0.1m", 1),
            ("250000u", 250),
            ("500000000n", 500),
            ("1e3", 1_000_000),
            ("1e-3", 1),
            ("1k", 1_000_000),
            ("+2", 2000),
            (".5", 500),
            ("5.", 5000),
            ("0", 0),
            ("-0", 0),
            ("0.000", 0),
            ("00012", 12_000),
            ("0.00000000000000000000000000000000000000001", 1),
        ];
        for (text, millis) in cases {
            assert_eq!(parse_cpu_millis(&quantity(text)), Ok(millis), "{text}");
        }
    }

    #[test]
    fn memory_quantities_in_bytes() {
        let cases: [(&str, u64); 20] = [
            ("128974848", 128_974_848),
            ("129e6", 129_000_000),
            ("129E6", 129_000_000),
            ("12E6", 12_000_000),
            ("129M", 129_000_000),
            ("123Mi", 128_974_848),
            ("1Ki", 1024),
            ("1.5Gi", 1_610_612_736),
            ("1k", 1000),
            ("1E", 1_000_000_000_000_000_000),
            ("1Ei", 1 << 60),
            ("15Ei", 15 << 60),
            ("2Ti", 2 << 40),
            ("3Pi", 3 << 50),
            ("0.5", 1),
            ("100m", 1),
            ("1e-30", 1),
            ("1e-400", 1),
            ("0e999999", 0),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_memory_bytes(&quantity(text)), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_quantities_are_errors() {
        let invalid = [
            "",
            "abc",
            "1Kb",
            "1 Ki",
            " 1",
            "1 ",
            "1K",
            "1ki",
            "e3",
            ".",
            "+",
            "-",
            "1e",
            "1e+",
            "1ee3",
            "Mi",
            "1.2.3",
            "1..",
            "0x10",
            "1_000",
            "１",
            "1Mi5",
            "1e3.5",
            "--1",
            "+-1",
            "1e99999999999999999999",
            "0.5e-9223372036854775808",
        ];
        for text in invalid {
            let cpu = parse_cpu_millis(&quantity(text)).expect_err(text);
            assert!(
                cpu.contains("not a valid quantity") || cpu.contains("range"),
                "{text}: {cpu}"
            );
            assert!(parse_memory_bytes(&quantity(text)).is_err(), "{text}");
        }
        for text in ["-1", "-100m", "-0.5Gi"] {
            let error = parse_memory_bytes(&quantity(text)).expect_err(text);
            assert!(error.contains("negative"), "{text}: {error}");
        }
        for text in ["16Ei", "18446744073709551616", "20E", "1e400", "1e17"] {
            let error = parse_cpu_millis(&quantity(text)).expect_err(text);
            assert!(error.contains("too large"), "{text}: {error}");
        }
        let digits = "1".repeat(39);
        let error = parse_memory_bytes(&quantity(&digits)).expect_err("39 digits");
        assert!(error.contains("too many significant digits"), "{error}");
    }

    #[test]
    fn pull_policy_defaults_like_the_api_server() {
        use PullPolicy::*;
        let cases = [
            ("busybox", None, Always),
            ("busybox:latest", None, Always),
            ("busybox:1.36", None, IfNotPresent),
            ("docker.io/library/busybox:1.36", None, IfNotPresent),
            ("localhost:5000/busybox", None, Always),
            ("localhost:5000/busybox:1.36", None, IfNotPresent),
            ("localhost:5000/busybox:latest", None, Always),
            ("busybox@sha256:0123abcd", None, IfNotPresent),
            ("localhost:5000/busybox@sha256:0123abcd", None, IfNotPresent),
            ("busybox:latest@sha256:0123abcd", None, Always),
            ("busybox:1.36@sha256:0123abcd", None, IfNotPresent),
            ("busybox", Some("IfNotPresent"), IfNotPresent),
            ("busybox:1.36", Some("Always"), Always),
            ("busybox", Some("Never"), Never),
        ];
        for (image, policy, expected) in cases {
            let container = Container {
                name: "c".to_owned(),
                image: Some(image.to_owned()),
                image_pull_policy: policy.map(str::to_owned),
                ..Container::default()
            };
            assert_eq!(pull_policy(&container), expected, "{image} {policy:?}");
        }
    }

    #[test]
    fn requests_follow_scheduler_semantics() {
        let pod = pod_with(&[
            (
                "/spec/initContainers",
                json!([
                    {"name": "migrate", "image": "busybox",
                     "resources": {"requests": {"cpu": "500m", "memory": "64Mi"}}},
                    {"name": "warm", "image": "busybox",
                     "resources": {"limits": {"cpu": "2"}}}
                ]),
            ),
            (
                "/spec/containers",
                json!([
                    {"name": "main", "image": "nginx",
                     "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                   "limits": {"cpu": "1"}}},
                    {"name": "limited", "image": "nginx",
                     "resources": {"limits": {"cpu": "250m", "memory": "256Mi"}}},
                    {"name": "besteffort", "image": "nginx"}
                ]),
            ),
            ("/spec/overhead", json!({"cpu": "10m", "memory": "1Mi"})),
        ]);
        validate(&pod).expect("valid");
        let mib = 1024 * 1024;
        assert_eq!(
            pod_requests(&pod),
            Ok(Resources {
                // max(100m + 250m, max(500m, 2)) + 10m overhead
                cpu_millis: 2010,
                // max(128Mi + 256Mi, 64Mi) + 1Mi overhead
                memory_bytes: 385 * mib,
                pods: 1,
            })
        );
        assert_eq!(
            pod_requests(&pod_with(&[])),
            Ok(Resources {
                cpu_millis: 0,
                memory_bytes: 0,
                pods: 1
            })
        );
        // A sidecar runs beside what starts after it: it adds to the later init
        // containers and to the app containers (KEP-753).
        let with_sidecar = pod_with(&[
            (
                "/spec/initContainers",
                json!([
                    {"name": "proxy", "image": "busybox", "restartPolicy": "Always",
                     "resources": {"requests": {"cpu": "200m", "memory": "32Mi"}}},
                    {"name": "migrate", "image": "busybox",
                     "resources": {"requests": {"cpu": "500m", "memory": "16Mi"}}}
                ]),
            ),
            (
                "/spec/containers/0/resources",
                json!({"requests": {"cpu": "100m", "memory": "64Mi"}}),
            ),
        ]);
        assert_eq!(
            pod_requests(&with_sidecar),
            Ok(Resources {
                // max(200m + 100m, 200m + 500m)
                cpu_millis: 700,
                // max(32Mi + 64Mi, 32Mi + 16Mi)
                memory_bytes: 96 * mib,
                pods: 1,
            })
        );
        let bad = pod_with(&[(
            "/spec/containers/0/resources",
            json!({"requests": {"cpu": "lots"}}),
        )]);
        assert_eq!(
            pod_requests(&bad).expect_err("bad cpu").field,
            "spec.containers[0].resources.requests[cpu]"
        );
    }

    #[test]
    fn expansion_follows_the_kubelet() {
        let env = [("A", "1"), ("B", "two")];
        let lookup = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let cases = [
            ("$(A)", "1"),
            ("x$(A)y", "x1y"),
            ("$(A)$(B)", "1two"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$1"),
            ("$$", "$"),
            ("$", "$"),
            ("a$b", "a$b"),
            ("$(MISSING)", "$(MISSING)"),
            ("$(A", "$(A"),
            ("$($(A)", "$($(A)"),
            ("$( $$", "$( $"),
            ("$($(A))", "$($(A))"),
            ("$()", "$()"),
            ("€$(A)€", "€1€"),
            ("no refs", "no refs"),
            ("", ""),
        ];
        for (input, expected) in cases {
            assert_eq!(expand(input, lookup), expected, "{input}");
        }
    }

    #[test]
    fn env_and_command_are_expanded() {
        let pod = pod_with(&[
            (
                "/spec/containers/0/env",
                json!([
                    {"name": "A", "value": "1"},
                    {"name": "B", "value": "$(A)-$(LATER)"},
                    {"name": "LATER", "value": "late"},
                    {"name": "D", "value": "$$(A)"},
                    {"name": "E"}
                ]),
            ),
            (
                "/spec/containers/0/command",
                json!(["sh", "-c", "echo $(A) $(B) $$(A) $(LATER) $(MISSING)"]),
            ),
            ("/spec/containers/0/args", json!(["$(D)"])),
        ]);
        let dir = PathBuf::from("/var/lib/beemesh/pods/x/volumes");
        let plan = app_plan(&pod, &context(&dir));
        let env: Vec<(&str, &str)> = plan
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("A", "1"),
                ("B", "1-$(LATER)"),
                ("LATER", "late"),
                ("D", "$(A)"),
                ("E", "")
            ]
        );
        assert_eq!(
            plan.command,
            Some(vec![
                "sh".to_owned(),
                "-c".to_owned(),
                "echo 1 1-$(LATER) $(A) late $(MISSING)".to_owned()
            ])
        );
        // D's value is not expanded a second time.
        assert_eq!(plan.args, Some(vec!["$(A)".to_owned()]));
    }

    #[test]
    fn later_env_definitions_replace_earlier_ones() {
        let pod = pod_with(&[(
            "/spec/containers/0/env",
            json!([
                {"name": "X", "value": "1"},
                {"name": "Y", "value": "$(X)"},
                {"name": "X", "value": "2"}
            ]),
        )]);
        let dir = PathBuf::from("/v");
        let plan = app_plan(&pod, &context(&dir));
        assert_eq!(
            plan.env,
            [
                ("X".to_owned(), "2".to_owned()),
                ("Y".to_owned(), "1".to_owned())
            ]
        );
    }

    #[test]
    fn empty_command_and_args_are_unset() {
        let pod = pod_with(&[
            ("/spec/containers/0/command", json!([])),
            ("/spec/containers/0/workingDir", json!("")),
        ]);
        let dir = PathBuf::from("/v");
        let plan = app_plan(&pod, &context(&dir));
        assert_eq!(plan.command, None);
        assert_eq!(plan.args, None);
        assert_eq!(plan.working_dir, None);
    }

    #[test]
    fn only_a_pod_ip_in_an_environment_needs_the_ip_before_the_containers() {
        let with_env = |pointer: &str, path: &str| {
            let env = json!([{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": path}}}]);
            pod_with(&[(pointer, env)])
        };
        assert!(!env_uses_pod_ip(&pod_with(&[])));
        assert!(!env_uses_pod_ip(&with_env(
            "/spec/containers/0/env",
            "status.hostIP"
        )));
        assert!(env_uses_pod_ip(&with_env(
            "/spec/containers/0/env",
            "status.podIP"
        )));
        assert!(env_uses_pod_ip(&with_env(
            "/spec/containers/0/env",
            "status.podIPs"
        )));
        let init = pod_with(&[(
            "/spec/initContainers",
            json!([{"name": "i", "image": "busybox", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]),
        )]);
        assert!(env_uses_pod_ip(&init));
    }

    #[test]
    fn field_refs_give_pod_facts() {
        let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
        let mut env = Vec::new();
        for (name, path) in [
            ("NAME", "metadata.name"),
            ("NAMESPACE", "metadata.namespace"),
            ("UID", "metadata.uid"),
            ("APP", "metadata.labels['app']"),
            ("NOLABEL", "metadata.labels['missing']"),
            ("TEAM", "metadata.annotations['team']"),
            ("NODE", "spec.nodeName"),
            ("SA", "spec.serviceAccountName"),
            ("POD_IP", "status.podIP"),
            ("POD_IPS", "status.podIPs"),
            ("HOST_IP", "status.hostIP"),
            ("HOST_IPS", "status.hostIPs"),
        ] {
            let mut var = field(path);
            set(&mut var, "/name", json!(name));
            env.push(var);
        }
        // An explicit apiVersion v1 is what the API server fills in.
        env.push(json!({"name": "V1", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}}));
        let pod = pod_with(&[
            ("/spec/containers/0/env", Value::Array(env)),
            ("/spec/serviceAccountName", json!("builder")),
        ]);
        let dir = PathBuf::from("/v");
        let unknown_ips = app_plan(&pod, &context(&dir));
        let value =
            |plan: &ContainerPlan, name: &str| env_lookup(&plan.env, name).expect(name).to_owned();
        assert_eq!(value(&unknown_ips, "NAME"), "web");
        assert_eq!(value(&unknown_ips, "NAMESPACE"), "shop");
        assert_eq!(value(&unknown_ips, "UID"), UID);
        assert_eq!(value(&unknown_ips, "APP"), "web");
        assert_eq!(value(&unknown_ips, "NOLABEL"), "");
        assert_eq!(value(&unknown_ips, "TEAM"), "blue");
        assert_eq!(value(&unknown_ips, "NODE"), "beemesh-node");
        assert_eq!(value(&unknown_ips, "SA"), "builder");
        assert_eq!(value(&unknown_ips, "V1"), "web");
        for name in ["POD_IP", "POD_IPS", "HOST_IP", "HOST_IPS"] {
            assert_eq!(value(&unknown_ips, name), "", "{name}");
        }

        let ctx = PlanContext {
            pod_ip: Some("10.88.0.7".parse().expect("ip")),
            host_ip: Some("fd00::1".parse().expect("ip")),
            ..context(&dir)
        };
        let known_ips = app_plan(&pod, &ctx);
        assert_eq!(value(&known_ips, "POD_IP"), "10.88.0.7");
        assert_eq!(value(&known_ips, "POD_IPS"), "10.88.0.7");
        assert_eq!(value(&known_ips, "HOST_IP"), "fd00::1");
        assert_eq!(value(&known_ips, "HOST_IPS"), "fd00::1");
    }

    #[test]
    fn resource_field_refs_divide_and_round_up() {
        let resource =
            |name: &str, resource: &str, divisor: Option<&str>, container: Option<&str>| {
                let mut selector = json!({"resource": resource});
                if let Some(divisor) = divisor {
                    set(&mut selector, "/divisor", json!(divisor));
                }
                if let Some(container) = container {
                    set(&mut selector, "/containerName", json!(container));
                }
                json!({"name": name, "valueFrom": {"resourceFieldRef": selector}})
            };
        let pod = pod_with(&[(
            "/spec/containers",
            json!([
                {"name": "main", "image": "nginx",
                 "resources": {"limits": {"cpu": "1500m", "memory": "256Mi"},
                               "requests": {"cpu": "250m"}},
                 "env": [
                     resource("CPU_LIMIT", "limits.cpu", None, None),
                     resource("CPU_LIMIT_M", "limits.cpu", Some("1m"), None),
                     resource("CPU_REQUEST_M", "requests.cpu", Some("1m"), None),
                     resource("MEM_REQUEST", "requests.memory", None, None),
                     resource("MEM_LIMIT_MI", "limits.memory", Some("1Mi"), None),
                     resource("ZERO_DIVISOR", "limits.memory", Some("0"), None),
                     resource("OTHER_CPU", "requests.cpu", None, Some("side"))
                 ]},
                {"name": "side", "image": "busybox"}
            ]),
        )]);
        let dir = PathBuf::from("/v");
        let plan = app_plan(&pod, &context(&dir));
        let value = |name: &str| env_lookup(&plan.env, name).expect(name).to_owned();
        assert_eq!(value("CPU_LIMIT"), "2");
        assert_eq!(value("CPU_LIMIT_M"), "1500");
        assert_eq!(value("CPU_REQUEST_M"), "250");
        // No memory request: the API server defaults it to the limit.
        assert_eq!(value("MEM_REQUEST"), "268435456");
        assert_eq!(value("MEM_LIMIT_MI"), "256");
        assert_eq!(value("ZERO_DIVISOR"), "268435456");
        assert_eq!(value("OTHER_CPU"), "0");
    }

    /// Pod changes that validate must refuse, with the field path of the refusal.
    fn refusals() -> Vec<(Vec<(&'static str, Value)>, &'static str)> {
        let init = |container: Value| ("/spec/initContainers", json!([container]));
        vec![
            // Metadata.
            (vec![("/metadata/uid", json!(""))], "metadata.uid"),
            (vec![("/metadata/name", Value::Null)], "metadata.name"),
            (vec![("/metadata/name", json!("Web_1"))], "metadata.name"),
            (
                vec![("/metadata/namespace", json!("a.b"))],
                "metadata.namespace",
            ),
            (vec![("/metadata/uid", json!("a/b"))], "metadata.uid"),
            (vec![("/spec", Value::Null)], "spec"),
            // Pod fields.
            (vec![("/spec/containers", json!([]))], "spec.containers"),
            (vec![("/spec/hostNetwork", json!(true))], "spec.hostNetwork"),
            (vec![("/spec/hostPID", json!(true))], "spec.hostPID"),
            (vec![("/spec/hostIPC", json!(true))], "spec.hostIPC"),
            (vec![("/spec/hostUsers", json!(false))], "spec.hostUsers"),
            (
                vec![("/spec/shareProcessNamespace", json!(true))],
                "spec.shareProcessNamespace",
            ),
            (
                vec![("/spec/activeDeadlineSeconds", json!(0))],
                "spec.activeDeadlineSeconds",
            ),
            (
                vec![("/spec/containers/0/terminationMessagePath", json!("why"))],
                "spec.containers[0].terminationMessagePath",
            ),
            (
                vec![(
                    "/spec/containers/0/terminationMessagePath",
                    json!("/tmp/../etc/shadow"),
                )],
                "spec.containers[0].terminationMessagePath",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "v", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "v", "mountPath": "/dev/termination-log"}]),
                    ),
                ],
                "spec.containers[0].terminationMessagePath",
            ),
            (
                vec![(
                    "/spec/containers/0/terminationMessagePolicy",
                    json!("Always"),
                )],
                "spec.containers[0].terminationMessagePolicy",
            ),
            (
                vec![(
                    "/spec/ephemeralContainers",
                    json!([{"name": "debug", "image": "busybox", "ports": [{"containerPort": 80}]}]),
                )],
                "spec.ephemeralContainers[0].ports",
            ),
            (
                vec![(
                    "/spec/ephemeralContainers",
                    json!([{"name": "debug", "image": "busybox", "targetContainerName": "nope"}]),
                )],
                "spec.ephemeralContainers[0].targetContainerName",
            ),
            (
                vec![(
                    "/spec/ephemeralContainers",
                    json!([{"name": "main", "image": "busybox"}]),
                )],
                "spec.ephemeralContainers[0].name",
            ),
            (
                vec![("/spec/runtimeClassName", json!("gvisor"))],
                "spec.runtimeClassName",
            ),
            (
                vec![(
                    "/spec/hostAliases",
                    json!([{"ip": "10.0.0.300", "hostnames": ["db"]}]),
                )],
                "spec.hostAliases[0].ip",
            ),
            (
                vec![(
                    "/spec/hostAliases",
                    json!([{"ip": "10.0.0.1", "hostnames": ["db", "db\n10.0.0.2 evil"]}]),
                )],
                "spec.hostAliases[0].hostnames[1]",
            ),
            (
                vec![("/spec/dnsConfig", json!({"nameservers": ["one.one"]}))],
                "spec.dnsConfig.nameservers[0]",
            ),
            (
                vec![(
                    "/spec/dnsConfig",
                    json!({"nameservers": ["1.1.1.1", "1.0.0.1", "8.8.8.8", "8.8.4.4"]}),
                )],
                "spec.dnsConfig.nameservers",
            ),
            (
                vec![("/spec/dnsConfig", json!({"searches": ["Bad_Domain"]}))],
                "spec.dnsConfig.searches[0]",
            ),
            (
                vec![("/spec/dnsConfig", json!({"options": [{"value": "2"}]}))],
                "spec.dnsConfig.options[0].name",
            ),
            (
                vec![(
                    "/spec/dnsConfig",
                    json!({"options": [{"name": "ndots", "value": "2\nnameserver 6.6.6.6"}]}),
                )],
                "spec.dnsConfig.options[0].value",
            ),
            (
                vec![("/spec/dnsPolicy", json!("None"))],
                "spec.dnsConfig.nameservers",
            ),
            (
                vec![("/spec/dnsPolicy", json!("Cluster"))],
                "spec.dnsPolicy",
            ),
            (
                vec![("/spec/resources", json!({"limits": {"cpu": "1"}}))],
                "spec.resources",
            ),
            (
                vec![("/spec/restartPolicy", json!("Sometimes"))],
                "spec.restartPolicy",
            ),
            (
                vec![("/spec/setHostnameAsFQDN", json!(true))],
                "spec.setHostnameAsFQDN",
            ),
            (
                vec![("/spec/os", json!({"name": "windows"}))],
                "spec.os.name",
            ),
            (
                vec![("/spec/hostname", json!("Not_A_Label"))],
                "spec.hostname",
            ),
            (
                vec![("/spec/hostnameOverride", json!("-bad"))],
                "spec.hostnameOverride",
            ),
            (
                vec![("/spec/overhead", json!({"cpu": "x"}))],
                "spec.overhead[cpu]",
            ),
            // Pod security context.
            (
                vec![(
                    "/spec/securityContext/sysctls",
                    json!([{"name": "net.core.somaxconn", "value": "1024"}]),
                )],
                "spec.securityContext.sysctls[0].name",
            ),
            (
                vec![(
                    "/spec/securityContext/sysctls",
                    json!([{"name": "kernel.shm_rmid_forced", "value": "1\nkernel.x=2"}]),
                )],
                "spec.securityContext.sysctls[0].value",
            ),
            (
                vec![("/spec/securityContext/fsGroup", json!(-1))],
                "spec.securityContext.fsGroup",
            ),
            (
                vec![(
                    "/spec/securityContext/supplementalGroups",
                    json!([1000, -5]),
                )],
                "spec.securityContext.supplementalGroups[1]",
            ),
            (
                vec![(
                    "/spec/securityContext/fsGroupChangePolicy",
                    json!("Sometimes"),
                )],
                "spec.securityContext.fsGroupChangePolicy",
            ),
            (
                vec![(
                    "/spec/securityContext/supplementalGroupsPolicy",
                    json!("Strict"),
                )],
                "spec.securityContext.supplementalGroupsPolicy",
            ),
            (
                vec![(
                    "/spec/securityContext/seLinuxOptions",
                    json!({"level": "s0:c1"}),
                )],
                "spec.securityContext.seLinuxOptions",
            ),
            (
                vec![(
                    "/spec/securityContext/seccompProfile",
                    json!({"type": "Localhost", "localhostProfile": "p.json"}),
                )],
                "spec.securityContext.seccompProfile",
            ),
            (
                vec![(
                    "/spec/securityContext/appArmorProfile",
                    json!({"type": "Unconfined"}),
                )],
                "spec.securityContext.appArmorProfile",
            ),
            (
                vec![(
                    "/spec/securityContext/windowsOptions",
                    json!({"runAsUserName": "x"}),
                )],
                "spec.securityContext.windowsOptions",
            ),
            (
                vec![("/spec/securityContext/runAsUser", json!(-1))],
                "spec.securityContext.runAsUser",
            ),
            // Container security context.
            (
                vec![("/spec/containers/0/securityContext/runAsGroup", json!(1000))],
                "spec.containers[0].securityContext.runAsGroup",
            ),
            (
                vec![(
                    "/spec/containers/0/securityContext/runAsUser",
                    json!(4_294_967_296_i64),
                )],
                "spec.containers[0].securityContext.runAsUser",
            ),
            (
                vec![(
                    "/spec/containers/0/securityContext/procMount",
                    json!("Unmasked"),
                )],
                "spec.containers[0].securityContext.procMount",
            ),
            (
                vec![(
                    "/spec/containers/0/securityContext/seccompProfile",
                    json!({"type": "Localhost"}),
                )],
                "spec.containers[0].securityContext.seccompProfile",
            ),
            (
                vec![(
                    "/spec/containers/0/securityContext/seLinuxOptions",
                    json!({"type": "spc_t"}),
                )],
                "spec.containers[0].securityContext.seLinuxOptions",
            ),
            (
                vec![(
                    "/spec/containers/0/securityContext/windowsOptions",
                    json!({"hostProcess": true}),
                )],
                "spec.containers[0].securityContext.windowsOptions",
            ),
            (
                vec![(
                    "/spec/containers/0/securityContext/appArmorProfile",
                    json!({"type": "Localhost", "localhostProfile": "p"}),
                )],
                "spec.containers[0].securityContext.appArmorProfile",
            ),
            // Container basics.
            (
                vec![("/spec/containers/0/name", json!(""))],
                "spec.containers[0].name",
            ),
            (
                vec![("/spec/containers/0/name", json!("Main"))],
                "spec.containers[0].name",
            ),
            (
                vec![("/spec/containers/0/image", Value::Null)],
                "spec.containers[0].image",
            ),
            (
                vec![("/spec/containers/0/image", json!(" nginx"))],
                "spec.containers[0].image",
            ),
            (
                vec![("/spec/containers/0/imagePullPolicy", json!("Sometimes"))],
                "spec.containers[0].imagePullPolicy",
            ),
            (
                vec![init(json!({"name": "main", "image": "busybox"}))],
                "spec.containers[0].name",
            ),
            (
                vec![(
                    "/spec/containers",
                    json!([
                        {"name": "a", "image": "busybox"}, {"name": "a", "image": "busybox"}
                    ]),
                )],
                "spec.containers[1].name",
            ),
            (
                vec![init(
                    json!({"name": "side", "image": "busybox", "restartPolicy": "Never"}),
                )],
                "spec.initContainers[0].restartPolicy",
            ),
            (
                vec![("/spec/containers/0/restartPolicy", json!("Never"))],
                "spec.containers[0].restartPolicy",
            ),
            (
                vec![(
                    "/spec/containers/0/restartPolicyRules",
                    json!([{"action": "Restart", "exitCodes": {"operator": "In", "values": [42]}}]),
                )],
                "spec.containers[0].restartPolicyRules",
            ),
            (
                vec![(
                    "/spec/containers/0/lifecycle",
                    json!({"postStart": {"exec": {"command": ["true"]}, "sleep": {"seconds": 1}}}),
                )],
                "spec.containers[0].lifecycle.postStart",
            ),
            (
                vec![(
                    "/spec/containers/0/lifecycle",
                    json!({"preStop": {"httpGet": {"port": 80, "scheme": "HTTPS"}}}),
                )],
                "spec.containers[0].lifecycle.preStop.httpGet.scheme",
            ),
            (
                vec![(
                    "/spec/containers/0/lifecycle",
                    json!({"stopSignal": "SIGUSR1"}),
                )],
                "spec.containers[0].lifecycle.stopSignal",
            ),
            (
                vec![(
                    "/spec/containers/0/livenessProbe",
                    json!({"grpc": {"port": 9000}}),
                )],
                "spec.containers[0].livenessProbe.grpc",
            ),
            (
                vec![(
                    "/spec/containers/0/readinessProbe",
                    json!({"grpc": {"port": 9000}}),
                )],
                "spec.containers[0].readinessProbe.grpc",
            ),
            (
                vec![(
                    "/spec/containers/0/startupProbe",
                    json!({"grpc": {"port": 9000}}),
                )],
                "spec.containers[0].startupProbe.grpc",
            ),
            (
                vec![init(
                    json!({"name": "setup", "image": "busybox", "readinessProbe": {"exec": {"command": ["true"]}}}),
                )],
                "spec.initContainers[0].readinessProbe",
            ),
            (
                vec![(
                    "/spec/containers/0/volumeDevices",
                    json!([{"name": "disk", "devicePath": "/dev/xvda"}]),
                )],
                "spec.containers[0].volumeDevices",
            ),
            // Ports.
            (
                vec![(
                    "/spec/containers/0/ports",
                    json!([{"containerPort": 80, "hostPort": 80, "protocol": "SCTP"}]),
                )],
                "spec.containers[0].ports[0].protocol",
            ),
            (
                vec![(
                    "/spec/containers/0/ports",
                    json!([{"containerPort": 80, "protocol": "QUIC"}]),
                )],
                "spec.containers[0].ports[0].protocol",
            ),
            (
                vec![(
                    "/spec/containers/0/ports",
                    json!([{"containerPort": 80, "hostPort": 70000}]),
                )],
                "spec.containers[0].ports[0].hostPort",
            ),
            (
                vec![("/spec/containers/0/ports", json!([{"containerPort": 0}]))],
                "spec.containers[0].ports[0].containerPort",
            ),
            (
                vec![(
                    "/spec/containers/0/ports",
                    json!([{"containerPort": 80, "hostPort": 80, "hostIP": "localhost"}]),
                )],
                "spec.containers[0].ports[0].hostIP",
            ),
            (
                vec![(
                    "/spec/containers",
                    json!([
                        {"name": "a", "image": "nginx", "ports": [{"containerPort": 80, "hostPort": 8080}]},
                        {"name": "b", "image": "nginx", "ports": [{"containerPort": 81, "hostPort": 8080, "protocol": "TCP"}]}
                    ]),
                )],
                "spec.containers[1].ports[0].hostPort",
            ),
            // Env.
            (
                vec![(
                    "/spec/containers/0/envFrom",
                    json!([{"configMapRef": {"name": "cfg"}}]),
                )],
                "spec.containers[0].envFrom",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "a"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.configMapKeyRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.secretKeyRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"fileKeyRef": {"volumeName": "v", "path": "p", "key": "a"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.fileKeyRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.fieldRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.fieldRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"fieldRef": {"apiVersion": "v2", "fieldPath": "metadata.name"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.fieldRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.resourceFieldRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "limits.ephemeral-storage"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.resourceFieldRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "containerName": "nope"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom.resourceFieldRef",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]),
                )],
                "spec.containers[0].env[0].valueFrom",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A", "valueFrom": {}}]),
                )],
                "spec.containers[0].env[0].valueFrom",
            ),
            (
                vec![(
                    "/spec/containers/0/env",
                    json!([{"name": "A=B", "value": "x"}]),
                )],
                "spec.containers[0].env[0].name",
            ),
            // Resources.
            (
                vec![(
                    "/spec/containers/0/resources",
                    json!({"limits": {"nvidia.com/gpu": "1"}}),
                )],
                "spec.containers[0].resources.limits[nvidia.com/gpu]",
            ),
            (
                vec![(
                    "/spec/containers/0/resources",
                    json!({"requests": {"hugepages-2Mi": "2Mi"}}),
                )],
                "spec.containers[0].resources.requests[hugepages-2Mi]",
            ),
            (
                vec![(
                    "/spec/containers/0/resources",
                    json!({"limits": {"cpu": "abc"}}),
                )],
                "spec.containers[0].resources.limits[cpu]",
            ),
            (
                vec![(
                    "/spec/containers/0/resources",
                    json!({"requests": {"memory": "-1Gi"}}),
                )],
                "spec.containers[0].resources.requests[memory]",
            ),
            (
                vec![(
                    "/spec/containers/0/resources",
                    json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}),
                )],
                "spec.containers[0].resources.requests[cpu]",
            ),
            (
                vec![(
                    "/spec/containers/0/resources",
                    json!({"claims": [{"name": "gpu"}]}),
                )],
                "spec.containers[0].resources.claims",
            ),
            // Volumes.
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "data", "hostPath": {"path": "/data"}}]),
                )],
                "spec.volumes[0].hostPath",
            ),
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "pvc", "persistentVolumeClaim": {"claimName": "data"}}]),
                )],
                "spec.volumes[0].persistentVolumeClaim",
            ),
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
                )],
                "spec.volumes[0].nfs",
            ),
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "both", "emptyDir": {}, "hostPath": {"path": "/"}}]),
                )],
                "spec.volumes[0].hostPath",
            ),
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "h", "emptyDir": {"medium": "HugePages"}}]),
                )],
                "spec.volumes[0].emptyDir.medium",
            ),
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "m", "emptyDir": {"mode": 448}}]),
                )],
                "spec.volumes[0].emptyDir.mode",
            ),
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "Bad_Name", "emptyDir": {}}]),
                )],
                "spec.volumes[0].name",
            ),
            (
                vec![(
                    "/spec/volumes",
                    json!([{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]),
                )],
                "spec.volumes[1].name",
            ),
            // Volume mounts.
            (
                vec![(
                    "/spec/containers/0/volumeMounts",
                    json!([{"name": "nope", "mountPath": "/data"}]),
                )],
                "spec.containers[0].volumeMounts[0].name",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "data", "mountPath": "data"}]),
                    ),
                ],
                "spec.containers[0].volumeMounts[0].mountPath",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([
                            {"name": "data", "mountPath": "/data"},
                            {"name": "data", "mountPath": "/data"}
                        ]),
                    ),
                ],
                "spec.containers[0].volumeMounts[1].mountPath",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "data", "mountPath": "/data", "subPath": "../etc"}]),
                    ),
                ],
                "spec.containers[0].volumeMounts[0].subPath",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "data", "mountPath": "/data", "subPath": "a/../../b"}]),
                    ),
                ],
                "spec.containers[0].volumeMounts[0].subPath",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "data", "mountPath": "/data", "subPath": "/etc"}]),
                    ),
                ],
                "spec.containers[0].volumeMounts[0].subPath",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "data", "mountPath": "/data", "subPathExpr": "$(POD)"}]),
                    ),
                ],
                "spec.containers[0].volumeMounts[0].subPathExpr",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "data", "mountPath": "/data", "mountPropagation": "Bidirectional"}]),
                    ),
                ],
                "spec.containers[0].volumeMounts[0].mountPropagation",
            ),
            (
                vec![
                    ("/spec/volumes", json!([{"name": "data", "emptyDir": {}}])),
                    (
                        "/spec/containers/0/volumeMounts",
                        json!([{"name": "data", "mountPath": "/data", "readOnly": true, "recursiveReadOnly": "Enabled"}]),
                    ),
                ],
                "spec.containers[0].volumeMounts[0].recursiveReadOnly",
            ),
        ]
    }

    #[test]
    fn refusals_name_the_field() {
        for (changes, field) in refusals() {
            let pod = pod_with(&changes);
            let error = validate(&pod).expect_err(field);
            assert_eq!(error.field, field, "{changes:?} gave \"{error}\"");
            assert!(!error.message.is_empty());
            // Plans never come from a refused pod.
            let dir = PathBuf::from("/v");
            assert_eq!(pod_plan(&pod, &context(&dir)), Err(error));
        }
    }

    #[test]
    fn refusal_messages_say_why() {
        let message = |changes: &[(&str, Value)]| {
            validate(&pod_with(changes))
                .expect_err("refused")
                .to_string()
        };
        assert_eq!(
            message(&[("/spec/containers/0/image", Value::Null)]),
            "spec.containers[0].image: required"
        );
        assert_eq!(
            message(&[("/spec/containers", json!([]))]),
            "spec.containers: a pod needs at least one container"
        );
        assert_eq!(
            message(&[(
                "/spec/volumes",
                json!([{"name": "a", "emptyDir": {}}, {"name": "data", "hostPath": {"path": "/"}}])
            )]),
            "spec.volumes[1].hostPath: hostPath volumes are not allowed"
        );
        assert_eq!(
            message(&[("/spec/containers/0/env", json!([{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}]))]),
            "spec.containers[0].env[0].valueFrom.configMapKeyRef: configMaps and secrets need a Kubernetes API server (pods from manifest files cannot use them)"
        );
        assert_eq!(
            message(&[(
                "/spec/initContainers",
                json!([{"name": "side", "image": "busybox", "restartPolicy": "OnFailure"}])
            )]),
            "spec.initContainers[0].restartPolicy: an init container's restartPolicy may only be Always (a sidecar)"
        );
    }

    /// Changes that validate must accept: API server defaults and settings that change
    /// nothing on an agent.
    #[test]
    fn control_plane_fields_and_defaults_are_accepted() {
        let accepted: Vec<Vec<(&str, Value)>> = vec![
            vec![("/spec/dnsPolicy", json!("ClusterFirst"))],
            vec![("/spec/dnsPolicy", json!("Default"))],
            vec![
                ("/spec/dnsPolicy", json!("None")),
                (
                    "/spec/dnsConfig",
                    json!({"nameservers": ["192.0.2.53"], "searches": ["corp.example."],
                           "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}),
                ),
            ],
            vec![(
                "/spec/hostAliases",
                json!([{"ip": "fd00::1", "hostnames": ["db.internal", "db"]}]),
            )],
            vec![("/spec/restartPolicy", json!("OnFailure"))],
            vec![("/spec/restartPolicy", json!("Never"))],
            vec![
                ("/spec/nodeName", json!("vk")),
                ("/spec/nodeSelector", json!({"disk": "ssd"})),
            ],
            vec![(
                "/spec/tolerations",
                json!([{"key": "k", "operator": "Exists"}]),
            )],
            vec![("/spec/affinity", json!({"nodeAffinity": {}}))],
            vec![
                ("/spec/schedulerName", json!("default-scheduler")),
                ("/spec/priority", json!(0)),
            ],
            vec![
                ("/spec/priorityClassName", json!("high")),
                ("/spec/preemptionPolicy", json!("Never")),
            ],
            vec![
                ("/spec/serviceAccountName", json!("default")),
                ("/spec/serviceAccount", json!("default")),
            ],
            vec![
                ("/spec/automountServiceAccountToken", json!(false)),
                ("/spec/enableServiceLinks", json!(true)),
            ],
            vec![(
                "/spec/topologySpreadConstraints",
                json!([{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]),
            )],
            vec![("/spec/schedulingGates", json!([{"name": "wait"}]))],
            vec![(
                "/spec/resourceClaims",
                json!([{"name": "gpu", "resourceClaimName": "gpu"}]),
            )],
            vec![
                ("/spec/setHostnameAsFQDN", json!(false)),
                ("/spec/subdomain", json!("svc")),
            ],
            vec![
                ("/spec/hostname", json!("db-0")),
                ("/spec/terminationGracePeriodSeconds", json!(5)),
            ],
            vec![
                ("/spec/hostNetwork", json!(false)),
                ("/spec/hostPID", json!(false)),
                ("/spec/hostIPC", json!(false)),
            ],
            vec![
                ("/spec/hostUsers", json!(true)),
                ("/spec/shareProcessNamespace", json!(false)),
            ],
            vec![("/spec/os", json!({"name": "linux"}))],
            vec![("/spec/securityContext", json!({}))],
            vec![(
                "/spec/securityContext/seccompProfile",
                json!({"type": "RuntimeDefault"}),
            )],
            vec![(
                "/spec/securityContext/seccompProfile",
                json!({"type": "Unconfined"}),
            )],
            vec![(
                "/spec/securityContext/appArmorProfile",
                json!({"type": "RuntimeDefault"}),
            )],
            vec![("/spec/securityContext/seLinuxOptions", json!({}))],
            vec![(
                "/spec/securityContext/supplementalGroupsPolicy",
                json!("Merge"),
            )],
            vec![
                ("/spec/securityContext/runAsNonRoot", json!(true)),
                ("/spec/securityContext/runAsUser", json!(1000)),
            ],
            vec![
                ("/spec/imagePullSecrets", json!([{"name": "regcred"}])),
                ("/spec/hostAliases", json!([])),
            ],
            vec![("/spec/overhead", json!({"cpu": "10m", "memory": "1Mi"}))],
            vec![
                (
                    "/spec/containers/0/terminationMessagePath",
                    json!("/dev/termination-log"),
                ),
                (
                    "/spec/containers/0/terminationMessagePolicy",
                    json!("FallbackToLogsOnError"),
                ),
            ],
            vec![(
                "/spec/containers/0/resizePolicy",
                json!([{"resourceName": "cpu", "restartPolicy": "NotRequired"}]),
            )],
            vec![(
                "/spec/containers/0/resources",
                json!({"limits": {"ephemeral-storage": "1Gi"}, "requests": {"cpu": "1", "memory": "1Gi"}}),
            )],
            vec![(
                "/spec/containers/0/securityContext",
                json!({"capabilities": {}, "allowPrivilegeEscalation": true, "procMount": "Default", "privileged": false}),
            )],
            vec![(
                "/spec/containers/0/securityContext/capabilities",
                json!({"add": [], "drop": []}),
            )],
            vec![(
                "/spec/containers/0/securityContext",
                json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}}),
            )],
            vec![(
                "/spec/containers/0/livenessProbe",
                json!({"httpGet": {"path": "/", "port": 80}}),
            )],
            vec![(
                "/spec/containers/0/readinessProbe",
                json!({"tcpSocket": {"port": 80}}),
            )],
            vec![(
                "/spec/containers/0/startupProbe",
                json!({"exec": {"command": ["true"]}}),
            )],
            vec![(
                "/spec/containers/0/ports",
                json!([{"name": "http", "containerPort": 80, "protocol": "TCP"}, {"containerPort": 53, "protocol": "UDP", "hostPort": 53, "hostIP": "::1"}]),
            )],
            vec![(
                "/spec/containers/0/env",
                json!([{"name": "EMPTY", "value": ""}, {"name": "weird.name-1", "value": "x"}]),
            )],
            vec![("/spec/containers/0/lifecycle", json!({}))],
            vec![(
                "/spec/ephemeralContainers",
                json!([{"name": "debugger", "image": "busybox", "targetContainerName": "main",
                        "stdin": true, "tty": true, "resources": {}}]),
            )],
            vec![(
                "/spec/readinessGates",
                json!([{"conditionType": "example.com/lb-ready"}]),
            )],
            vec![(
                "/spec/initContainers",
                json!([{"name": "proxy", "image": "busybox", "restartPolicy": "Always",
                        "startupProbe": {"tcpSocket": {"port": 15021}},
                        "lifecycle": {"preStop": {"sleep": {"seconds": 1}}}}]),
            )],
            vec![(
                "/spec/containers/0/lifecycle",
                json!({"postStart": {"exec": {"command": ["true"]}}, "preStop": {"sleep": {"seconds": 5}}}),
            )],
            vec![(
                "/spec/containers/0/lifecycle",
                json!({"preStop": {"httpGet": {"port": 80, "path": "/drain"}}}),
            )],
            vec![
                (
                    "/spec/volumes",
                    json!([{"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}, {"name": "plain"}]),
                ),
                (
                    "/spec/containers/0/volumeMounts",
                    json!([
                        {"name": "mem", "mountPath": "/dev/shm", "mountPropagation": "None"},
                        {"name": "plain", "mountPath": "/plain", "readOnly": true, "recursiveReadOnly": "IfPossible"}
                    ]),
                ),
            ],
            vec![(
                "/spec/initContainers",
                json!([{"name": "setup", "image": "busybox", "ports": [{"containerPort": 80, "hostPort": 8080}]}]),
            )],
        ];
        for changes in accepted {
            assert_eq!(validate(&pod_with(&changes)), Ok(()), "{changes:?}");
        }
    }

    #[test]
    fn names_and_labels() {
        let pod = pod_with(&[(
            "/spec/initContainers",
            json!([{"name": "setup", "image": "busybox"}]),
        )]);
        let dir = PathBuf::from("/v");
        let ctx = context(&dir);
        let plan = pod_plan(&pod, &ctx).expect("pod plan");
        assert_eq!(plan.name, "shop_web_5f3a9c1e-7b2d-4c1a-9e8f-0123456789ab_3");
        assert_eq!(plan.hostname, "web");
        let expected: BTreeMap<String, String> = [
            ("io.beemesh.pod.uid", UID),
            ("io.beemesh.pod.namespace", "shop"),
            ("io.beemesh.pod.name", "web"),
            ("io.beemesh.epoch", "3"),
            ("io.beemesh.agent", "agent-peer"),
            ("io.beemesh.owner", "owner-peer"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(plan.labels, expected);

        let spec = pod.spec.as_ref().expect("spec");
        let init = &spec.init_containers.as_ref().expect("init")[0];
        let init_plan =
            container_plan(&pod, init, ContainerKind::Init, 2, &ctx).expect("init plan");
        assert_eq!(
            init_plan.name,
            "shop_web_5f3a9c1e-7b2d-4c1a-9e8f-0123456789ab_3_setup_2"
        );
        let mut expected_init = expected.clone();
        for (k, v) in [
            ("io.beemesh.container", "setup"),
            ("io.beemesh.container.kind", "init"),
            ("io.beemesh.attempt", "2"),
        ] {
            expected_init.insert(k.to_owned(), v.to_owned());
        }
        assert_eq!(init_plan.labels, expected_init);

        let app_plan =
            container_plan(&pod, app(&pod, 0), ContainerKind::App, 0, &ctx).expect("app");
        assert_eq!(
            app_plan.name,
            "shop_web_5f3a9c1e-7b2d-4c1a-9e8f-0123456789ab_3_main_0"
        );
        assert_eq!(app_plan.labels["io.beemesh.container.kind"], "app");
        assert_eq!(app_plan.image, "nginx:1.25");
        assert_eq!(app_plan.pull_policy, PullPolicy::IfNotPresent);

        // The container must be the pod's, of the kind given.
        let error =
            container_plan(&pod, init, ContainerKind::App, 0, &ctx).expect_err("wrong kind");
        assert_eq!(error.field, "spec.containers");

        let short = PodRef {
            uid: PodUid("abc".to_owned()),
            namespace: "default".to_owned(),
            name: "x".to_owned(),
        };
        assert_eq!(podman_pod_name(&short, Epoch(0)), "default_x_abc_0");
    }

    #[test]
    fn pod_ref_defaults_the_namespace() {
        let pod = pod_with(&[("/metadata/namespace", Value::Null)]);
        let pod_ref = pod_ref(&pod).expect("pod ref");
        assert_eq!(pod_ref.namespace, "default");
        assert_eq!(pod_ref.name, "web");
        assert_eq!(pod_ref.uid, PodUid(UID.to_owned()));
        let no_uid = pod_with(&[("/metadata/uid", Value::Null)]);
        assert_eq!(pod_ref_field(&no_uid), "metadata.uid");
    }

    fn pod_ref_field(pod: &Pod) -> String {
        pod_ref(pod).expect_err("no pod ref").field
    }

    #[test]
    fn run_as_non_root_is_checked_against_the_user_the_container_runs_as() {
        let check = |security: Value, image_user: &str| {
            let pod = pod_with(&[("/spec/securityContext", security)]);
            verify_run_as_non_root(&pod, app(&pod, 0), image_user)
        };
        let non_root = || json!({"runAsNonRoot": true});
        assert_eq!(check(json!({}), ""), Ok(()));
        assert_eq!(check(non_root(), "1000"), Ok(()));
        assert_eq!(check(non_root(), "1000:1000"), Ok(()));
        assert_eq!(
            check(json!({"runAsNonRoot": true, "runAsUser": 1000}), "root"),
            Ok(())
        );
        let root = check(non_root(), "").expect_err("root image");
        assert!(
            root.starts_with("container has runAsNonRoot and image will run as root (pod: \""),
            "{root}"
        );
        assert!(
            root.ends_with(&format!("(pod: \"web_shop({UID})\", container: main)")),
            "{root}"
        );
        assert!(check(non_root(), "0:0")
            .expect_err("uid 0")
            .contains("image will run as root"));
        assert!(check(non_root(), "nobody")
            .expect_err("a name")
            .contains("image has non-numeric user (nobody), cannot verify user is non-root"));
        assert!(check(json!({"runAsNonRoot": true, "runAsUser": 0}), "1000")
            .expect_err("runAsUser 0")
            .starts_with("container's runAsUser breaks non-root policy"));
    }

    #[test]
    fn each_instance_gets_its_termination_message_file_at_the_path_asked_for() {
        let dir = PathBuf::from("/v/p");
        let pod = pod_with(&[]);
        let plan = container_plan(&pod, app(&pod, 0), ContainerKind::App, 2, &context(&dir))
            .expect("container plan");
        assert_eq!(
            plan.termination_message,
            TerminationMessage {
                host_file: PathBuf::from("/v/p/.termination/main_2"),
                container_path: "/dev/termination-log".into(),
            }
        );
        let custom = pod_with(&[
            (
                "/spec/containers/0/terminationMessagePath",
                json!("/tmp/why"),
            ),
            (
                "/spec/containers/0/terminationMessagePolicy",
                json!("FallbackToLogsOnError"),
            ),
        ]);
        let plan = container_plan(
            &custom,
            app(&custom, 0),
            ContainerKind::App,
            0,
            &context(&dir),
        )
        .expect("container plan");
        assert_eq!(plan.termination_message.container_path, "/tmp/why");
        assert!(falls_back_to_logs(app(&custom, 0)));
        assert!(!falls_back_to_logs(app(&pod, 0)));
    }

    #[test]
    fn supplemental_groups_and_fs_group_are_every_containers_groups() {
        let dir = PathBuf::from("/v");
        let pod = pod_with(&[(
            "/spec/securityContext",
            json!({"supplementalGroups": [3000, 2000], "fsGroup": 2000,
                   "fsGroupChangePolicy": "OnRootMismatch"}),
        )]);
        let plan = container_plan(&pod, app(&pod, 0), ContainerKind::App, 0, &context(&dir))
            .expect("container plan");
        assert_eq!(plan.supplemental_groups, [3000, 2000]);
        assert!(plan.sysctls.is_empty());
        let tuned = pod_with(&[(
            "/spec/securityContext/sysctls",
            json!([{"name": "net.ipv4.ip_local_port_range", "value": "2000\t60000"}]),
        )]);
        let plan = container_plan(
            &tuned,
            app(&tuned, 0),
            ContainerKind::App,
            0,
            &context(&dir),
        )
        .expect("container plan");
        assert_eq!(
            plan.sysctls,
            BTreeMap::from([(
                "net.ipv4.ip_local_port_range".to_owned(),
                "2000\t60000".to_owned()
            )])
        );
        assert_eq!(fs_group(&pod), Some(2000));
        assert_eq!(fs_group(&pod_with(&[])), None);
    }

    #[test]
    fn dns_config_and_host_aliases_go_into_the_pod_plan() {
        let dir = PathBuf::from("/v");
        let plan = pod_plan(
            &pod_with(&[
                (
                    "/spec/dnsConfig",
                    json!({"nameservers": ["192.0.2.53"], "options": [{"name": "ndots", "value": "3"}]}),
                ),
                (
                    "/spec/hostAliases",
                    json!([{"ip": "192.0.2.10", "hostnames": ["db.internal", "db"]},
                           {"ip": "fd00::1", "hostnames": ["cache"]}]),
                ),
            ]),
            &context(&dir),
        )
        .expect("pod plan");
        let resolv = plan.dns.expect("a resolv.conf of the pod's");
        assert_eq!(resolv.nameservers, ["10.0.0.2", "192.0.2.53"]);
        assert_eq!(resolv.searches, ["corp.example"]);
        assert_eq!(resolv.options, ["edns0", "ndots:3"]);
        let ip = |text: &str| text.parse::<IpAddr>().expect("ip");
        assert_eq!(
            plan.host_aliases,
            [
                ("db.internal".to_owned(), ip("192.0.2.10")),
                ("db".to_owned(), ip("192.0.2.10")),
                ("cache".to_owned(), ip("fd00::1")),
            ]
        );
        // Without a dnsConfig the runtime's default (the agent's own file) stays.
        let plain = pod_plan(&pod_with(&[]), &context(&dir)).expect("pod plan");
        assert_eq!(plain.dns, None);
        assert!(plain.host_aliases.is_empty());
    }

    #[test]
    fn hostnames_follow_the_kubelet() {
        let hostname = |changes: &[(&str, Value)]| {
            let dir = PathBuf::from("/v");
            pod_plan(&pod_with(changes), &context(&dir))
                .expect("pod plan")
                .hostname
        };
        assert_eq!(hostname(&[("/spec/hostname", json!("db-0"))]), "db-0");
        assert_eq!(
            hostname(&[
                ("/spec/hostname", json!("db-0")),
                ("/spec/hostnameOverride", json!("db.example"))
            ]),
            "db.example"
        );
        // 62 characters, then '-' and more: cut at 63 and the trailing '-' dropped.
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(20));
        assert_eq!(hostname(&[("/metadata/name", json!(long))]), "a".repeat(62));
    }

    #[test]
    fn security_context_and_flags_reach_the_plan() {
        let pod = pod_with(&[
            (
                "/spec/securityContext",
                json!({"runAsUser": 1000, "runAsGroup": 3000, "runAsNonRoot": true}),
            ),
            (
                "/spec/containers/0/securityContext",
                json!({"runAsUser": 1001, "privileged": true, "readOnlyRootFilesystem": true}),
            ),
            ("/spec/containers/0/tty", json!(true)),
            ("/spec/containers/0/stdin", json!(true)),
            ("/spec/containers/0/stdinOnce", json!(true)),
            ("/spec/containers/0/workingDir", json!("/srv")),
            (
                "/spec/containers/0/resources",
                json!({"limits": {"cpu": "250m", "memory": "64Mi"}}),
            ),
        ]);
        let dir = PathBuf::from("/v");
        let plan = app_plan(&pod, &context(&dir));
        assert_eq!(plan.user.as_deref(), Some("1001:3000"));
        assert!(plan.privileged && plan.read_only_root_fs);
        assert!(plan.tty && plan.stdin && plan.stdin_once);
        assert_eq!(plan.working_dir.as_deref(), Some("/srv"));
        assert_eq!(plan.cpu_limit_millis, Some(250));
        assert_eq!(plan.memory_limit_bytes, Some(64 * 1024 * 1024));

        let plain = app_plan(&pod_with(&[]), &context(&dir));
        assert_eq!(plain.user, None);
        assert!(!plain.privileged && !plain.read_only_root_fs && !plain.tty);
        assert_eq!(
            (plain.cpu_limit_millis, plain.memory_limit_bytes),
            (None, None)
        );

        let user_only = pod_with(&[(
            "/spec/containers/0/securityContext",
            json!({"runAsUser": 0}),
        )]);
        assert_eq!(
            app_plan(&user_only, &context(&dir)).user.as_deref(),
            Some("0")
        );
    }

    #[test]
    fn memory_volumes_are_sized_as_the_kubelet_sizes_them() {
        let sizes = |volumes: serde_json::Value, limits: &[Option<&str>]| -> Vec<Option<u64>> {
            let containers: Vec<serde_json::Value> = limits
                .iter()
                .enumerate()
                .map(|(i, limit)| {
                    let resources = limit.map_or(json!({}), |l| json!({"limits": {"memory": l}}));
                    json!({"name": format!("c{i}"), "image": "busybox", "resources": resources})
                })
                .collect();
            let pod = pod_with(&[
                ("/spec/volumes", volumes),
                ("/spec/containers", json!(containers)),
            ]);
            memory_volumes(&pod, Epoch(3))
                .expect("memory volumes")
                .iter()
                .map(|v| v.size_bytes)
                .collect()
        };
        let mib = 1 << 20;
        let volumes = json!([
            {"name": "sized", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "unsized", "emptyDir": {"medium": "Memory"}},
            {"name": "disk", "emptyDir": {"sizeLimit": "1Gi"}}
        ]);
        // The sizeLimit, capped by the pod's memory limit when every container has one.
        assert_eq!(
            sizes(volumes.clone(), &[Some("16Mi"), Some("32Mi")]),
            [Some(48 * mib), Some(48 * mib)]
        );
        assert_eq!(
            sizes(volumes.clone(), &[Some("1Gi"), None]),
            [Some(64 * mib), None]
        );
        assert_eq!(sizes(json!([]), &[None]), []);
        let pod = pod_with(&[("/spec/volumes", volumes)]);
        let named = memory_volumes(&pod, Epoch(3)).expect("memory volumes");
        assert_eq!(named[0].name, "sized");
        assert_eq!(
            named[0].volume,
            "shop_web_5f3a9c1e-7b2d-4c1a-9e8f-0123456789ab_3_sized"
        );
    }

    #[test]
    fn empty_dirs_become_mounts() {
        let pod = pod_with(&[
            (
                "/spec/volumes",
                json!([
                    {"name": "cache", "emptyDir": {}},
                    {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                    {"name": "plain"}
                ]),
            ),
            (
                "/spec/containers/0/volumeMounts",
                json!([
                    {"name": "cache", "mountPath": "/cache"},
                    {"name": "scratch", "mountPath": "/scratch", "readOnly": true},
                    {"name": "cache", "mountPath": "/var/log/app", "subPath": "logs/app"},
                    {"name": "plain", "mountPath": "/plain", "subPath": ""},
                    {"name": "cache", "mountPath": "/odd", "subPath": "./odd//path/"},
                    {"name": "cache", "mountPath": "/dot", "subPath": "."}
                ]),
            ),
        ]);
        // The memory-backed one is the runtime's tmpfs, not a directory of the agent's.
        assert_eq!(empty_dirs(&pod), ["cache", "plain"]);
        let dir = PathBuf::from("/var/lib/beemesh/pods/p/volumes");
        let tmpfs = PathBuf::from("/var/lib/containers/storage/volumes/scratch-tmpfs/_data");
        let memory_dirs = BTreeMap::from([("scratch".to_string(), tmpfs.clone())]);
        let ctx = PlanContext {
            memory_dirs: &memory_dirs,
            group_socket_dir: None,
            ..context(&dir)
        };
        let plan = app_plan(&pod, &ctx);
        let mount =
            |volume: &str, sub_path: Option<&str>, container: &str, read_only: bool| Mount {
                volume: volume.to_owned(),
                volume_dir: if volume == "scratch" {
                    tmpfs.clone()
                } else {
                    dir.join(volume)
                },
                sub_path: sub_path.map(PathBuf::from),
                container_path: container.to_owned(),
                read_only,
            };
        assert_eq!(
            plan.mounts,
            [
                mount("cache", None, "/cache", false),
                mount("scratch", None, "/scratch", true),
                mount("cache", Some("logs/app"), "/var/log/app", false),
                mount("plain", None, "/plain", false),
                mount("cache", Some("odd/path"), "/odd", false),
                mount("cache", None, "/dot", false),
            ]
        );
        let hosts: Vec<PathBuf> = plan.mounts.iter().map(Mount::host_path).collect();
        assert_eq!(
            hosts,
            [
                "/var/lib/beemesh/pods/p/volumes/cache",
                "/var/lib/containers/storage/volumes/scratch-tmpfs/_data",
                "/var/lib/beemesh/pods/p/volumes/cache/logs/app",
                "/var/lib/beemesh/pods/p/volumes/plain",
                "/var/lib/beemesh/pods/p/volumes/cache/odd/path",
                "/var/lib/beemesh/pods/p/volumes/cache",
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn host_ports_become_mappings() {
        let pod = pod_with(&[
            (
                "/spec/containers",
                json!([
                    {"name": "web", "image": "nginx", "ports": [
                        {"containerPort": 80, "hostPort": 8080},
                        {"containerPort": 53, "hostPort": 5353, "protocol": "UDP", "hostIP": "127.0.0.1"},
                        {"containerPort": 9090},
                        {"containerPort": 9091, "hostPort": 0}
                    ]},
                    {"name": "tls", "image": "nginx", "ports": [
                        {"containerPort": 443, "hostPort": 8443, "protocol": "TCP"},
                        {"containerPort": 53, "hostPort": 5353, "protocol": "TCP"}
                    ]}
                ]),
            ),
            // The kubelet maps no ports of regular init containers.
            (
                "/spec/initContainers",
                json!([{"name": "setup", "image": "busybox", "ports": [{"containerPort": 1, "hostPort": 9999}]}]),
            ),
        ]);
        let dir = PathBuf::from("/v");
        let plan = pod_plan(&pod, &context(&dir)).expect("pod plan");
        let mapping = |container_port, host_port, host_ip: Option<&str>, protocol| PortMapping {
            container_port,
            host_port,
            host_ip: host_ip.map(str::to_owned),
            protocol,
        };
        assert_eq!(
            plan.ports,
            [
                mapping(80, 8080, None, Protocol::Tcp),
                mapping(53, 5353, Some("127.0.0.1"), Protocol::Udp),
                mapping(443, 8443, None, Protocol::Tcp),
                mapping(53, 5353, None, Protocol::Tcp),
            ]
        );
        assert_eq!(host_ports(&pod), [5353, 8080, 8443]);
        assert!(host_ports(&pod_with(&[])).is_empty());
    }

    #[test]
    fn grace_period_has_the_kubelet_minimum() {
        let grace = |changes: &[(&str, Value)]| grace_period_secs(&pod_with(changes));
        assert_eq!(grace(&[]), 30);
        assert_eq!(
            grace(&[("/spec/terminationGracePeriodSeconds", json!(10))]),
            10
        );
        assert_eq!(
            grace(&[("/spec/terminationGracePeriodSeconds", json!(0))]),
            2
        );
        assert_eq!(
            grace(&[("/spec/terminationGracePeriodSeconds", json!(-5))]),
            2
        );
        assert_eq!(
            grace(&[
                ("/spec/terminationGracePeriodSeconds", json!(60)),
                ("/metadata/deletionGracePeriodSeconds", json!(5))
            ]),
            5
        );
        let pod = pod_with(&[("/spec/terminationGracePeriodSeconds", json!(45))]);
        let dir = PathBuf::from("/v");
        assert_eq!(app_plan(&pod, &context(&dir)).stop_timeout_secs, 45);
    }

    #[test]
    fn odd_pods_give_errors_not_panics() {
        let empty = Pod::default();
        assert!(validate(&empty).is_err());
        assert!(pod_requests(&empty).is_err());
        assert!(host_ports(&empty).is_empty());
        assert!(empty_dirs(&empty).is_empty());
        assert_eq!(grace_period_secs(&empty), 30);
        let dir = PathBuf::from("/v");
        assert!(pod_plan(&empty, &context(&dir)).is_err());
        assert!(container_plan(
            &empty,
            &Container::default(),
            ContainerKind::App,
            0,
            &context(&dir)
        )
        .is_err());

        let odd = pod_with(&[
            ("/metadata/uid", json!("ü")),
            (
                "/spec/containers/0/ports",
                json!([{"containerPort": -1, "hostPort": -1}]),
            ),
            (
                "/spec/containers/0/env",
                json!([{"name": "", "value": "$("}]),
            ),
            ("/spec/volumes", json!([{"name": ""}])),
        ]);
        assert!(validate(&odd).is_err());
        assert!(host_ports(&odd).is_empty());
        assert_eq!(empty_dirs(&odd), [""]);
        assert!(pod_requests(&odd).is_ok());
    }

    /// The pod a k3s 1.21 API server returned for `kubectl apply` of a bare busybox pod
    /// (from the captured fixture pods-list-fieldselector.json): what an API server adds.
    const FIXTURE_POD: &str = r#"
{
  "metadata": {
    "name": "cap",
    "namespace": "default",
    "uid": "a2df8023-27ed-4e57-8a05-4bd1cdcdd21f",
    "resourceVersion": "386",
    "creationTimestamp": "2026-11-22T16:52:14Z",
    "annotations": {
      "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"annotations\":{},\"name\":\"cap\",\"namespace\":\"default\"},\"spec\":{\"containers\":[{\"image\":\"busybox\",\"name\":\"main\"}],\"nodeName\":\"capture-node\"}}\n"
    },
    "managedFields": [
      {
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2026-11-22T16:52:14Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
          "f:metadata": {
            "f:annotations": {
              ".": {},
              "f:kubectl.kubernetes.io/last-applied-configuration": {}
            }
          },
          "f:spec": {
            "f:containers": {
              "k:{\"name\":\"main\"}": {
                ".": {},
                "f:image": {},
                "f:imagePullPolicy": {},
                "f:name": {},
                "f:resources": {},
                "f:terminationMessagePath": {},
                "f:terminationMessagePolicy": {}
              }
            },
            "f:dnsPolicy": {},
            "f:enableServiceLinks": {},
            "f:nodeName": {},
            "f:restartPolicy": {},
            "f:schedulerName": {},
            "f:securityContext": {},
            "f:terminationGracePeriodSeconds": {}
          }
        }
      },
      {
        "manager": "curl",
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2026-11-22T16:52:15Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
          "f:status": {
            "f:conditions": {
              ".": {},
              "k:{\"type\":\"Ready\"}": {
                ".": {},
                "f:lastProbeTime": {},
                "f:type": {}
              }
            },
            "f:containerStatuses": {},
            "f:phase": {},
            "f:podIP": {},
            "f:podIPs": {
              ".": {},
              "k:{\"ip\":\"127.0.0.1\"}": {
                ".": {},
                "f:ip": {}
              }
            }
          }
        }
      },
      {
        "manager": "k3s",
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2026-11-22T16:52:55Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
          "f:status": {
            "f:conditions": {
              "k:{\"type\":\"Ready\"}": {
                "f:lastTransitionTime": {},
                "f:status": {}
              }
            }
          }
        }
      }
    ]
  },
  "spec": {
    "volumes": [
      {
        "name": "kube-api-access-kk4hb",
        "projected": {
          "sources": [
            {
              "serviceAccountToken": {
                "expirationSeconds": 3607,
                "path": "token"
              }
            },
            {
              "configMap": {
                "name": "kube-root-ca.crt",
                "items": [
                  {
                    "key": "ca.crt",
                    "path": "ca.crt"
                  }
                ]
              }
            },
            {
              "downwardAPI": {
                "items": [
                  {
                    "path": "namespace",
                    "fieldRef": {
                      "apiVersion": "v1",
                      "fieldPath": "metadata.namespace"
                    }
                  }
                ]
              }
            }
          ],
          "defaultMode": 420
        }
      }
    ],
    "containers": [
      {
        "name": "main",
        "image": "busybox",
        "resources": {},
        "volumeMounts": [
          {
            "name": "kube-api-access-kk4hb",
            "readOnly": true,
            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"
          }
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "Always"
      }
    ],
    "restartPolicy": "Always",
    "terminationGracePeriodSeconds": 30,
    "dnsPolicy": "ClusterFirst",
    "serviceAccountName": "default",
    "serviceAccount": "default",
    "nodeName": "capture-node",
    "securityContext": {},
    "schedulerName": "default-scheduler",
    "tolerations": [
      {
        "key": "node.kubernetes.io/not-ready",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300
      },
      {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300
      }
    ],
    "priority": 0,
    "enableServiceLinks": true,
    "preemptionPolicy": "PreemptLowerPriority"
  },
  "status": {
    "phase": "Running",
    "conditions": [
      {
        "type": "Ready",
        "status": "False",
        "lastProbeTime": null,
        "lastTransitionTime": "2026-11-22T16:52:55Z"
      }
    ],
    "podIP": "127.0.0.1",
    "podIPs": [
      {
        "ip": "127.0.0.1"
      }
    ],
    "containerStatuses": [
      {
        "name": "main",
        "state": {
          "running": {
            "startedAt": "2026-11-22T16:52:13Z"
          }
        },
        "lastState": {},
        "ready": true,
        "restartCount": 0,
        "image": "busybox",
        "imageID": ""
      }
    ],
    "qosClass": "BestEffort"
  }
}"#;

    #[test]
    fn api_server_pod_is_accepted_with_its_token_volume_mounted_read_only() {
        let pod: Pod = serde_json::from_str(FIXTURE_POD).expect("fixture pod");
        assert_eq!(validate(&pod), Ok(()));
        assert_eq!(file_volumes(&pod), ["kube-api-access-kk4hb"]);

        let dir = PathBuf::from("/v");
        let ctx = context(&dir);
        let pod_plan = pod_plan(&pod, &ctx).expect("pod plan");
        assert_eq!(
            pod_plan.name,
            "default_cap_a2df8023-27ed-4e57-8a05-4bd1cdcdd21f_3"
        );
        assert_eq!(pod_plan.hostname, "cap");
        assert!(pod_plan.ports.is_empty());
        let plan = app_plan(&pod, &ctx);
        assert_eq!(plan.image, "busybox");
        assert_eq!(plan.pull_policy, PullPolicy::Always);
        assert_eq!(plan.stop_timeout_secs, 30);
        assert!(plan.env.is_empty());
        assert_eq!(
            plan.mounts,
            [Mount {
                volume: "kube-api-access-kk4hb".into(),
                volume_dir: Path::new(FILES_DIR).join("kube-api-access-kk4hb"),
                sub_path: None,
                container_path: "/var/run/secrets/kubernetes.io/serviceaccount".into(),
                read_only: true,
            }]
        );
        assert_eq!(
            pod_requests(&pod),
            Ok(Resources {
                cpu_millis: 0,
                memory_bytes: 0,
                pods: 1
            })
        );
    }
}
