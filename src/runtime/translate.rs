//! Kubernetes pod specs to runtime plans, the way the kubelet reads them.
//!
//! Pure: no I/O. [`validate`] refuses, with the field's path, anything that would
//! change what runs and that a plan cannot express; fields that only Kubernetes'
//! control plane uses (scheduling, service accounts, ...) are accepted and ignored,
//! since pods from a real API server always carry them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Component, Path};

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec, Probe, SecurityContext};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::{labels, ContainerPlan, Mount, PodPlan, PortMapping, Protocol, PullPolicy};
use crate::wire::{Epoch, PodRef, PodUid, Resources};

/// A reason a pod cannot run here; shown to users as the pod's status message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerKind {
    Init,
    App,
}

impl ContainerKind {
    fn label(self) -> &'static str {
        match self {
            ContainerKind::Init => "init",
            ContainerKind::App => "app",
        }
    }
}

/// What the agent knows when it creates a container.
pub struct PlanContext<'a> {
    /// The agent's peer ID.
    pub agent: &'a str,
    /// The owner's peer ID.
    pub owner: &'a str,
    pub epoch: Epoch,
    /// Where this pod's emptyDir volumes live: `<volumes_dir>/<volume name>`.
    pub volumes_dir: &'a Path,
    pub pod_ip: Option<IpAddr>,
    pub host_ip: Option<IpAddr>,
    pub node_name: &'a str,
}

const DEFAULT_GRACE_SECS: u64 = 30;

fn spec(pod: &Pod) -> Result<&PodSpec, SpecError> {
    pod.spec.as_ref().ok_or_else(|| err("spec", "required"))
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = (String, &Container)> {
    spec.init_containers
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| (format!("spec.initContainers[{i}]"), c))
        .chain(
            spec.containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.containers[{i}]"), c)),
        )
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The pod's identity; namespace defaults to `default`.
pub fn pod_ref(pod: &Pod) -> Result<PodRef, SpecError> {
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| err("metadata.name", "required"))?;
    let uid = pod
        .metadata
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| err("metadata.uid", "required"))?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    Ok(PodRef {
        uid: PodUid(uid),
        namespace,
        name,
    })
}

/// `<namespace>_<name>_<uid8>_<epoch>`: unique per placement.
pub fn podman_pod_name(pod: &PodRef, epoch: Epoch) -> String {
    let uid8: String = pod.uid.0.chars().take(8).collect();
    format!("{}_{}_{}_{}", pod.namespace, pod.name, uid8, epoch)
}

/// The projected service-account token volume API servers add to pods by default.
/// A later issue serves it; until then it is refused with a message that says so.
fn check_service_account_volume(field: &str, name: &str) -> Result<(), SpecError> {
    Err(err(
        field,
        format!(
            "volume {name:?} (the service-account token an API server adds) is not supported yet; \
             set automountServiceAccountToken: false"
        ),
    ))
}

/// Refuses what BeeMesh cannot run as asked.
pub fn validate(pod: &Pod) -> Result<(), SpecError> {
    pod_ref(pod)?;
    let spec = spec(pod)?;
    if spec.containers.is_empty() {
        return Err(err("spec.containers", "a pod needs at least one container"));
    }
    match spec.restart_policy.as_deref() {
        None | Some("Always" | "OnFailure" | "Never") => {}
        Some(other) => {
            return Err(err(
                "spec.restartPolicy",
                format!("{other:?} is not one of Always, OnFailure, Never"),
            ))
        }
    }
    let refuse_if = |set: bool, field: &str, message: &str| {
        if set {
            Err(err(field, message))
        } else {
            Ok(())
        }
    };
    refuse_if(
        spec.host_network == Some(true),
        "spec.hostNetwork",
        "host networking is not supported",
    )?;
    refuse_if(
        spec.host_pid == Some(true),
        "spec.hostPID",
        "the host PID namespace is not supported",
    )?;
    refuse_if(
        spec.host_ipc == Some(true),
        "spec.hostIPC",
        "the host IPC namespace is not supported",
    )?;
    refuse_if(
        spec.share_process_namespace == Some(true),
        "spec.shareProcessNamespace",
        "a shared process namespace is not supported",
    )?;
    refuse_if(
        spec.active_deadline_seconds.is_some(),
        "spec.activeDeadlineSeconds",
        "active deadlines are not supported",
    )?;
    refuse_if(
        spec.ephemeral_containers
            .as_ref()
            .is_some_and(|e| !e.is_empty()),
        "spec.ephemeralContainers",
        "ephemeral containers are not supported",
    )?;
    refuse_if(
        spec.image_pull_secrets
            .as_ref()
            .is_some_and(|s| !s.is_empty()),
        "spec.imagePullSecrets",
        "pull secrets are not supported yet (agents use their local images)",
    )?;
    refuse_if(
        spec.runtime_class_name.is_some(),
        "spec.runtimeClassName",
        "runtime classes are not supported",
    )?;
    refuse_if(
        spec.host_aliases.as_ref().is_some_and(|a| !a.is_empty()),
        "spec.hostAliases",
        "host aliases are not supported yet",
    )?;
    refuse_if(
        spec.dns_config.is_some(),
        "spec.dnsConfig",
        "custom DNS configuration is not supported",
    )?;
    refuse_if(
        spec.readiness_gates.as_ref().is_some_and(|g| !g.is_empty()),
        "spec.readinessGates",
        "readiness gates are not supported",
    )?;
    refuse_if(
        spec.os.as_ref().is_some_and(|os| os.name != "linux"),
        "spec.os.name",
        "agents run Linux containers only",
    )?;
    if let Some(ctx) = &spec.security_context {
        refuse_if(
            ctx.sysctls.as_ref().is_some_and(|s| !s.is_empty()),
            "spec.securityContext.sysctls",
            "sysctls are not supported",
        )?;
        refuse_if(
            ctx.se_linux_options.is_some(),
            "spec.securityContext.seLinuxOptions",
            "SELinux options are not supported",
        )?;
        refuse_if(
            ctx.windows_options.is_some(),
            "spec.securityContext.windowsOptions",
            "Windows options are not supported",
        )?;
    }

    let mut empty_dirs = HashSet::new();
    for (i, volume) in spec.volumes.iter().flatten().enumerate() {
        let field = format!("spec.volumes[{i}]");
        if volume.empty_dir.is_some() {
            empty_dirs.insert(volume.name.as_str());
            continue;
        }
        if volume.projected.is_some() && volume.name.starts_with("kube-api-access-") {
            return check_service_account_volume(&format!("{field}.projected"), &volume.name);
        }
        let kind = if volume.host_path.is_some() {
            return Err(err(
                format!("{field}.hostPath"),
                "hostPath volumes are not allowed",
            ));
        } else if volume.config_map.is_some() {
            "configMap"
        } else if volume.secret.is_some() {
            "secret"
        } else if volume.downward_api.is_some() {
            "downwardAPI"
        } else if volume.projected.is_some() {
            "projected"
        } else if volume.persistent_volume_claim.is_some() {
            "persistentVolumeClaim"
        } else {
            "this volume type"
        };
        return Err(err(
            field,
            format!(
                "volume {:?}: {kind} volumes are not supported yet (only emptyDir)",
                volume.name
            ),
        ));
    }

    let mut names = HashSet::new();
    for (field, c) in all_containers(spec) {
        validate_container(&field, c, &empty_dirs)?;
        if !names.insert(c.name.as_str()) {
            return Err(err(
                format!("{field}.name"),
                format!("duplicate container name {:?}", c.name),
            ));
        }
    }
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let field = format!("spec.initContainers[{i}]");
        refuse_if(
            c.restart_policy.is_some(),
            &format!("{field}.restartPolicy"),
            "sidecar containers are not supported yet",
        )?;
        refuse_if(
            c.lifecycle.is_some(),
            &format!("{field}.lifecycle"),
            "lifecycle hooks are not supported",
        )?;
        for (probe, name) in [
            (&c.liveness_probe, "livenessProbe"),
            (&c.readiness_probe, "readinessProbe"),
            (&c.startup_probe, "startupProbe"),
        ] {
            refuse_if(
                probe.is_some(),
                &format!("{field}.{name}"),
                "init containers cannot have probes",
            )?;
        }
    }
    pod_requests(pod)?;
    Ok(())
}

fn validate_container(
    field: &str,
    c: &Container,
    empty_dirs: &HashSet<&str>,
) -> Result<(), SpecError> {
    if !is_dns_label(&c.name) {
        return Err(err(
            format!("{field}.name"),
            format!("{:?} is not a valid container name (a DNS label)", c.name),
        ));
    }
    if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
        return Err(err(format!("{field}.image"), "required"));
    }
    match c.image_pull_policy.as_deref() {
        None | Some("Always" | "IfNotPresent" | "Never") => {}
        Some(other) => {
            return Err(err(
                format!("{field}.imagePullPolicy"),
                format!("{other:?} is not one of Always, IfNotPresent, Never"),
            ))
        }
    }
    if c.lifecycle.is_some() {
        return Err(err(
            format!("{field}.lifecycle"),
            "lifecycle hooks are not supported",
        ));
    }
    if c.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(err(
            format!("{field}.envFrom"),
            "envFrom needs the Kubernetes API; not supported yet",
        ));
    }
    for (i, env) in c.env.iter().flatten().enumerate() {
        validate_env(&format!("{field}.env[{i}]"), env)?;
    }
    for (i, port) in c.ports.iter().flatten().enumerate() {
        let pf = format!("{field}.ports[{i}]");
        if !(1..=65535).contains(&port.container_port) {
            return Err(err(
                format!("{pf}.containerPort"),
                format!("{} is not a valid port", port.container_port),
            ));
        }
        if let Some(hp) = port.host_port {
            if !(1..=65535).contains(&hp) {
                return Err(err(
                    format!("{pf}.hostPort"),
                    format!("{hp} is not a valid port"),
                ));
            }
        }
        match port.protocol.as_deref() {
            None | Some("TCP" | "UDP") => {}
            Some(other) => {
                return Err(err(
                    format!("{pf}.protocol"),
                    format!("{other} is not supported (TCP, UDP)"),
                ))
            }
        }
    }
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let mf = format!("{field}.volumeMounts[{i}]");
        if !empty_dirs.contains(m.name.as_str()) {
            return Err(err(
                format!("{mf}.name"),
                format!("no volume named {:?} in spec.volumes", m.name),
            ));
        }
        if !m.mount_path.starts_with('/') {
            return Err(err(format!("{mf}.mountPath"), "must be an absolute path"));
        }
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if !is_relative_inside(sub) {
                return Err(err(
                    format!("{mf}.subPath"),
                    "must be a relative path without '..'",
                ));
            }
        }
        if m.sub_path_expr.is_some() {
            return Err(err(format!("{mf}.subPathExpr"), "not supported"));
        }
        if m.mount_propagation.as_deref().is_some_and(|p| p != "None") {
            return Err(err(
                format!("{mf}.mountPropagation"),
                "only None is supported",
            ));
        }
    }
    if c.volume_devices.as_ref().is_some_and(|d| !d.is_empty()) {
        return Err(err(
            format!("{field}.volumeDevices"),
            "block devices are not supported",
        ));
    }
    for (probe, name) in [
        (&c.liveness_probe, "livenessProbe"),
        (&c.readiness_probe, "readinessProbe"),
        (&c.startup_probe, "startupProbe"),
    ] {
        if let Some(p) = probe {
            validate_probe(&format!("{field}.{name}"), p)?;
        }
    }
    if let Some(sc) = &c.security_context {
        validate_security(&format!("{field}.securityContext"), sc)?;
    }
    for (kind, list) in [
        (
            "limits",
            &c.resources.as_ref().and_then(|r| r.limits.clone()),
        ),
        (
            "requests",
            &c.resources.as_ref().and_then(|r| r.requests.clone()),
        ),
    ] {
        for (resource, q) in list.iter().flatten() {
            let rf = format!("{field}.resources.{kind}.{resource}");
            match resource.as_str() {
                "cpu" => {
                    parse_cpu_millis(q).map_err(|m| err(&rf, m))?;
                }
                "memory" | "ephemeral-storage" => {
                    parse_memory_bytes(q).map_err(|m| err(&rf, m))?;
                }
                other => return Err(err(rf, format!("resource {other:?} is not supported"))),
            }
        }
    }
    Ok(())
}

fn validate_env(field: &str, env: &EnvVar) -> Result<(), SpecError> {
    if env.name.is_empty() {
        return Err(err(format!("{field}.name"), "required"));
    }
    let Some(from) = &env.value_from else {
        return Ok(());
    };
    if from.config_map_key_ref.is_some() {
        return Err(err(
            format!("{field}.valueFrom.configMapKeyRef"),
            "configMapKeyRef needs the Kubernetes API; not supported yet",
        ));
    }
    if from.secret_key_ref.is_some() {
        return Err(err(
            format!("{field}.valueFrom.secretKeyRef"),
            "secretKeyRef needs the Kubernetes API; not supported yet",
        ));
    }
    if from.resource_field_ref.is_some() {
        return Err(err(
            format!("{field}.valueFrom.resourceFieldRef"),
            "not supported yet",
        ));
    }
    if from.file_key_ref.is_some() {
        return Err(err(
            format!("{field}.valueFrom.fileKeyRef"),
            "not supported",
        ));
    }
    if let Some(f) = &from.field_ref {
        if field_value(
            &f.field_path,
            &Pod::default(),
            &PlanContextValues::default(),
        )
        .is_none()
        {
            return Err(err(
                format!("{field}.valueFrom.fieldRef.fieldPath"),
                format!("{:?} is not supported", f.field_path),
            ));
        }
    }
    Ok(())
}

fn validate_probe(field: &str, p: &Probe) -> Result<(), SpecError> {
    if p.grpc.is_some() {
        return Err(err(
            format!("{field}.grpc"),
            "gRPC probes are not supported (use exec, httpGet or tcpSocket)",
        ));
    }
    if p.exec.is_none() && p.http_get.is_none() && p.tcp_socket.is_none() {
        return Err(err(field, "a probe needs exec, httpGet or tcpSocket"));
    }
    Ok(())
}

fn validate_security(field: &str, sc: &SecurityContext) -> Result<(), SpecError> {
    if sc
        .capabilities
        .as_ref()
        .is_some_and(|c| c.add.as_ref().is_some_and(|a| !a.is_empty()))
    {
        return Err(err(
            format!("{field}.capabilities.add"),
            "adding capabilities is not supported",
        ));
    }
    if sc.se_linux_options.is_some() {
        return Err(err(
            format!("{field}.seLinuxOptions"),
            "SELinux options are not supported",
        ));
    }
    if sc.windows_options.is_some() {
        return Err(err(
            format!("{field}.windowsOptions"),
            "Windows options are not supported",
        ));
    }
    if sc.proc_mount.as_deref().is_some_and(|p| p != "Default") {
        return Err(err(
            format!("{field}.procMount"),
            "only Default is supported",
        ));
    }
    if sc
        .seccomp_profile
        .as_ref()
        .is_some_and(|s| s.type_ == "Localhost")
    {
        return Err(err(
            format!("{field}.seccompProfile"),
            "Localhost profiles are not supported",
        ));
    }
    Ok(())
}

fn is_relative_inside(path: &str) -> bool {
    let p = Path::new(path);
    !p.is_absolute()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Kubernetes' default pull policy: Always for `:latest` or an untagged image (without
/// digest), IfNotPresent otherwise.
pub fn pull_policy(container: &Container) -> PullPolicy {
    match container.image_pull_policy.as_deref() {
        Some("Always") => return PullPolicy::Always,
        Some("Never") => return PullPolicy::Never,
        Some("IfNotPresent") => return PullPolicy::IfNotPresent,
        _ => {}
    }
    let image = container.image.as_deref().unwrap_or_default();
    if image.contains('@') {
        return PullPolicy::IfNotPresent;
    }
    // A colon after the last slash is a tag; before it, a registry port.
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.rsplit_once(':') {
        Some((_, "latest")) | None => PullPolicy::Always,
        Some(_) => PullPolicy::IfNotPresent,
    }
}

/// Parses a quantity into thousandths of its unit, rounding up as Kubernetes'
/// `MilliValue` does.
fn parse_milli(q: &Quantity) -> Result<u128, String> {
    let text = q.0.trim();
    let bad = || format!("{text:?} is not a valid quantity");
    if text.is_empty() || text.starts_with('-') {
        return Err(bad());
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number = number.strip_prefix('+').unwrap_or(number);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    // value = digits / 10^frac_len * multiplier; everything in u128 thousandths.
    let digits: u128 = format!("{int_part}{frac_part}")
        .parse()
        .map_err(|_| bad())?;
    let (num, den): (u128, u128) = match suffix {
        "" => (1000, 1),
        "m" => (1, 1),
        "k" => (1000 * 1000, 1),
        "M" => (1000 * 1_000_000, 1),
        "G" => (1000 * 1_000_000_000, 1),
        "T" => (1000 * 1_000_000_000_000, 1),
        "P" => (1000 * 1_000_000_000_000_000, 1),
        "E" => (1000 * 1_000_000_000_000_000_000, 1),
        "Ki" => (1000 << 10, 1),
        "Mi" => (1000 << 20, 1),
        "Gi" => (1000 << 30, 1),
        "Ti" => (1000 << 40, 1),
        "Pi" => (1000 << 50, 1),
        "Ei" => (1000 << 60, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().map_err(|_| bad())?;
            if !(-3..=18).contains(&exp) {
                return Err(bad());
            }
            if exp >= 0 {
                (1000 * 10u128.pow(exp as u32), 1)
            } else {
                (1000, 10u128.pow((-exp) as u32))
            }
        }
        _ => return Err(bad()),
    };
    let scale = 10u128.checked_pow(frac_part.len() as u32).ok_or_else(bad)?;
    let numerator = digits
        .checked_mul(num)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    let denominator = scale * den;
    Ok(numerator.div_ceil(denominator))
}

/// CPU in millicores ("100m" → 100, "0.5" → 500, "2" → 2000).
pub fn parse_cpu_millis(q: &Quantity) -> Result<u64, String> {
    u64::try_from(parse_milli(q)?).map_err(|_| format!("{:?} is too large", q.0))
}

/// Bytes ("64Mi", "1G", "1e3", "128974848").
pub fn parse_memory_bytes(q: &Quantity) -> Result<u64, String> {
    let milli = parse_milli(q)?;
    u64::try_from(milli.div_ceil(1000)).map_err(|_| format!("{:?} is too large", q.0))
}

fn container_requests(c: &Container) -> Result<Resources, SpecError> {
    let resources = c.resources.as_ref();
    // The API server defaults requests to limits when only limits are given.
    let get = |name: &str| {
        resources
            .and_then(|r| r.requests.as_ref().and_then(|m| m.get(name)))
            .or_else(|| resources.and_then(|r| r.limits.as_ref().and_then(|m| m.get(name))))
    };
    let cpu = get("cpu")
        .map(parse_cpu_millis)
        .transpose()
        .map_err(|m| err(format!("containers[{}].resources.cpu", c.name), m))?;
    let memory = get("memory")
        .map(parse_memory_bytes)
        .transpose()
        .map_err(|m| err(format!("containers[{}].resources.memory", c.name), m))?;
    Ok(Resources {
        cpu_millis: cpu.unwrap_or(0),
        memory_bytes: memory.unwrap_or(0),
        pods: 0,
    })
}

/// What the scheduler counts: max(sum over app containers, each init container),
/// plus the pod overhead, and one pod.
pub fn pod_requests(pod: &Pod) -> Result<Resources, SpecError> {
    let spec = spec(pod)?;
    let mut app = Resources::default();
    for c in &spec.containers {
        app = app.saturating_add(container_requests(c)?);
    }
    let mut total = app;
    for c in spec.init_containers.iter().flatten() {
        let init = container_requests(c)?;
        total.cpu_millis = total.cpu_millis.max(init.cpu_millis);
        total.memory_bytes = total.memory_bytes.max(init.memory_bytes);
    }
    for (name, q) in spec.overhead.iter().flatten() {
        let field = format!("spec.overhead.{name}");
        match name.as_str() {
            "cpu" => {
                total.cpu_millis = total
                    .cpu_millis
                    .saturating_add(parse_cpu_millis(q).map_err(|m| err(&field, m))?)
            }
            "memory" => {
                total.memory_bytes = total
                    .memory_bytes
                    .saturating_add(parse_memory_bytes(q).map_err(|m| err(&field, m))?)
            }
            _ => {}
        }
    }
    total.pods = 1;
    Ok(total)
}

/// Host ports the pod binds (TCP and UDP alike).
pub fn host_ports(pod: &Pod) -> Vec<u16> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let mut ports: Vec<u16> = all_containers(spec)
        .flat_map(|(_, c)| c.ports.iter().flatten())
        .filter_map(|p| p.host_port.and_then(|hp| u16::try_from(hp).ok()))
        .filter(|p| *p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Names of the pod's emptyDir volumes.
pub fn empty_dirs(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter(|v| v.empty_dir.is_some())
        .map(|v| v.name.clone())
        .collect()
}

/// terminationGracePeriodSeconds; 30 s by default.
pub fn grace_period_secs(pod: &Pod) -> u64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .map_or(DEFAULT_GRACE_SECS, |g| u64::try_from(g).unwrap_or(0))
}

fn base_labels(pod: &PodRef, ctx: &PlanContext) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::POD_UID.to_string(), pod.uid.0.clone()),
        (labels::POD_NAMESPACE.to_string(), pod.namespace.clone()),
        (labels::POD_NAME.to_string(), pod.name.clone()),
        (labels::EPOCH.to_string(), ctx.epoch.to_string()),
        (labels::AGENT.to_string(), ctx.agent.to_string()),
        (labels::OWNER.to_string(), ctx.owner.to_string()),
    ])
}

/// The Podman pod: name, hostname, labels, host ports.
pub fn pod_plan(pod: &Pod, ctx: &PlanContext) -> Result<PodPlan, SpecError> {
    let pod_ref = pod_ref(pod)?;
    let spec = spec(pod)?;
    let hostname = spec
        .hostname
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod_ref.name.chars().take(63).collect());
    let ports = all_containers(spec)
        .flat_map(|(_, c)| c.ports.iter().flatten())
        .filter_map(|p| {
            let host_port = u16::try_from(p.host_port?).ok().filter(|p| *p != 0)?;
            Some(PortMapping {
                container_port: u16::try_from(p.container_port).ok()?,
                host_port,
                host_ip: p.host_ip.clone().filter(|ip| !ip.is_empty()),
                protocol: if p.protocol.as_deref() == Some("UDP") {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
            })
        })
        .collect();
    Ok(PodPlan {
        name: podman_pod_name(&pod_ref, ctx.epoch),
        hostname,
        labels: base_labels(&pod_ref, ctx),
        ports,
    })
}

/// The values fieldRef can read, gathered once.
#[derive(Default)]
struct PlanContextValues {
    pod_ip: Option<IpAddr>,
    host_ip: Option<IpAddr>,
    node_name: String,
}

fn field_value(path: &str, pod: &Pod, ctx: &PlanContextValues) -> Option<String> {
    let meta = &pod.metadata;
    let ip = |ip: Option<IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    match path {
        "metadata.name" => Some(meta.name.clone().unwrap_or_default()),
        "metadata.namespace" => Some(meta.namespace.clone().unwrap_or_else(|| "default".into())),
        "metadata.uid" => Some(meta.uid.clone().unwrap_or_default()),
        "spec.nodeName" => Some(ctx.node_name.clone()),
        "spec.serviceAccountName" => Some(
            pod.spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default(),
        ),
        "status.podIP" | "status.podIPs" => Some(ip(ctx.pod_ip)),
        "status.hostIP" | "status.hostIPs" => Some(ip(ctx.host_ip)),
        _ => keyed("metadata.labels['", &meta.labels)
            .or_else(|| keyed("metadata.annotations['", &meta.annotations)),
    }
}

/// Expands `$(VAR)` references to variables defined so far; `$$` escapes a `$`;
/// unknown references stay as written, as the kubelet does.
fn expand(text: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match vars.get(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
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

/// One container instance to create.
pub fn container_plan(
    pod: &Pod,
    container: &Container,
    kind: ContainerKind,
    attempt: u32,
    ctx: &PlanContext,
) -> Result<ContainerPlan, SpecError> {
    let pod_ref = pod_ref(pod)?;
    let spec = spec(pod)?;
    let values = PlanContextValues {
        pod_ip: ctx.pod_ip,
        host_ip: ctx.host_ip,
        node_name: ctx.node_name.to_string(),
    };
    let mut vars: HashMap<String, String> = HashMap::new();
    let mut env = Vec::new();
    for (i, e) in container.env.iter().flatten().enumerate() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(from)) => {
                let path = from
                    .field_ref
                    .as_ref()
                    .map(|f| f.field_path.as_str())
                    .ok_or_else(|| {
                        err(format!("env[{i}].valueFrom"), "only fieldRef is supported")
                    })?;
                field_value(path, pod, &values).ok_or_else(|| {
                    err(
                        format!("env[{i}].valueFrom.fieldRef"),
                        format!("{path:?} is not supported"),
                    )
                })?
            }
            (Some(v), None) => expand(v, &vars),
            (None, None) => String::new(),
        };
        vars.insert(e.name.clone(), value.clone());
        env.push((e.name.clone(), value));
    }
    let expand_all = |list: &Option<Vec<String>>| {
        list.as_ref()
            .map(|l| l.iter().map(|a| expand(a, &vars)).collect())
    };

    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let mut host_path = ctx.volumes_dir.join(&m.name);
        if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if !is_relative_inside(sub) {
                return Err(err(
                    "volumeMounts.subPath",
                    "must be a relative path without '..'",
                ));
            }
            host_path = host_path.join(sub);
        }
        mounts.push(Mount {
            host_path,
            container_path: m.mount_path.clone(),
            read_only: m.read_only == Some(true),
        });
    }

    let limits = container.resources.as_ref().and_then(|r| r.limits.as_ref());
    let memory_limit_bytes = limits
        .and_then(|l| l.get("memory"))
        .map(parse_memory_bytes)
        .transpose()
        .map_err(|m| err("resources.limits.memory", m))?;
    let cpu_limit_millis = limits
        .and_then(|l| l.get("cpu"))
        .map(parse_cpu_millis)
        .transpose()
        .map_err(|m| err("resources.limits.cpu", m))?;

    let pod_sc = spec.security_context.as_ref();
    let sc = container.security_context.as_ref();
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group));
    let user = match (run_as_user, run_as_group) {
        (Some(u), Some(g)) => Some(format!("{u}:{g}")),
        (Some(u), None) => Some(u.to_string()),
        (None, Some(g)) => Some(format!("0:{g}")),
        (None, None) => None,
    };

    let mut plan_labels = base_labels(&pod_ref, ctx);
    plan_labels.insert(labels::CONTAINER.into(), container.name.clone());
    plan_labels.insert(labels::CONTAINER_KIND.into(), kind.label().into());
    plan_labels.insert(labels::ATTEMPT.into(), attempt.to_string());

    Ok(ContainerPlan {
        name: format!(
            "{}_{}_{}",
            podman_pod_name(&pod_ref, ctx.epoch),
            container.name,
            attempt
        ),
        image: container.image.clone().unwrap_or_default(),
        pull_policy: pull_policy(container),
        command: expand_all(&container.command),
        args: expand_all(&container.args),
        env,
        working_dir: container.working_dir.clone().filter(|d| !d.is_empty()),
        memory_limit_bytes,
        cpu_limit_millis,
        mounts,
        labels: plan_labels,
        tty: container.tty == Some(true),
        stdin: container.stdin == Some(true),
        stdin_once: container.stdin_once == Some(true),
        user,
        privileged: sc.and_then(|s| s.privileged) == Some(true),
        read_only_root_fs: sc.and_then(|s| s.read_only_root_filesystem) == Some(true),
        stop_timeout_secs: grace_period_secs(pod),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn q(s: &str) -> Quantity {
        Quantity(s.to_string())
    }

    fn pod_from(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("valid test pod")
    }

    fn ctx(dir: &Path) -> PlanContext<'_> {
        PlanContext {
            agent: "agent1",
            owner: "owner1",
            epoch: Epoch(7),
            volumes_dir: dir,
            pod_ip: Some("10.88.0.9".parse().expect("ip")),
            host_ip: None,
            node_name: "beemesh",
        }
    }

    const BASE: &str = r#"
metadata: {name: web, namespace: team, uid: 0123456789abcdef, labels: {app: web}}
spec:
  containers:
  - name: main
    image: localhost/busybox:1.35
"#;

    #[test]
    fn quantities() {
        for (text, cpu) in [
            ("100m", 100),
            ("0.5", 500),
            ("2", 2000),
            ("1.25", 1250),
            ("0.0001", 1),
            ("1e3", 1_000_000),
            ("+1", 1000),
        ] {
            assert_eq!(parse_cpu_millis(&q(text)), Ok(cpu), "{text}");
        }
        for (text, bytes) in [
            ("64Mi", 64 << 20),
            ("1G", 1_000_000_000),
            ("1Gi", 1 << 30),
            ("128974848", 128_974_848),
            ("1.5Ki", 1536),
            ("1e3", 1000),
            ("12E", 12_000_000_000_000_000_000),
        ] {
            assert_eq!(parse_memory_bytes(&q(text)), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "-1",
            "abc",
            "1.2.3",
            "1Zi",
            "1e99",
            "m",
            ".",
            "99999999999999999999999999999999999Ei",
        ] {
            assert!(parse_memory_bytes(&q(bad)).is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn pull_policy_defaults_like_kubernetes() {
        let c = |image: &str, policy: Option<&str>| Container {
            image: Some(image.into()),
            image_pull_policy: policy.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(pull_policy(&c("busybox", None)), PullPolicy::Always);
        assert_eq!(pull_policy(&c("busybox:latest", None)), PullPolicy::Always);
        assert_eq!(
            pull_policy(&c("localhost:5000/busybox", None)),
            PullPolicy::Always
        );
        assert_eq!(
            pull_policy(&c("localhost:5000/busybox:1.35", None)),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            pull_policy(&c("busybox@sha256:abcd", None)),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            pull_policy(&c("busybox:latest", Some("Never"))),
            PullPolicy::Never
        );
    }

    #[test]
    fn requests_follow_the_scheduler() {
        let pod = pod_from(
            r#"
metadata: {name: p, uid: u}
spec:
  initContainers:
  - {name: init, image: i, resources: {requests: {cpu: "2", memory: 16Mi}}}
  containers:
  - {name: a, image: i, resources: {requests: {cpu: 100m, memory: 64Mi}}}
  - {name: b, image: i, resources: {limits: {cpu: 200m, memory: 32Mi}}}
"#,
        );
        assert_eq!(
            pod_requests(&pod),
            Ok(Resources {
                cpu_millis: 2000,
                memory_bytes: 96 << 20,
                pods: 1
            })
        );
    }

    #[test]
    fn variables_expand_like_the_kubelet() {
        let vars = HashMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$-$(", &vars), "x-$(B)-$(A)-$-$(");
    }

    #[test]
    fn plans_carry_names_labels_env_mounts_and_ports() {
        let pod = pod_from(
            r#"
metadata: {name: web, namespace: team, uid: 0123456789abcdef, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 3
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: main
    image: localhost/busybox:1.35
    command: ["sh", "-c"]
    args: ["echo $(GREETING) $(POD_IP)"]
    env:
    - {name: WHO, value: world}
    - {name: GREETING, value: "hello $(WHO)"}
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    - name: APP
      valueFrom: {fieldRef: {fieldPath: "metadata.labels['app']"}}
    - name: HOST
      valueFrom: {fieldRef: {fieldPath: status.hostIP}}
    ports: [{containerPort: 80, hostPort: 8080}, {containerPort: 53, hostPort: 5353, protocol: UDP}]
    volumeMounts:
    - {name: data, mountPath: /data}
    - {name: data, mountPath: /sub, subPath: nested/dir, readOnly: true}
    resources: {limits: {cpu: 250m, memory: 64Mi}}
    securityContext: {runAsUser: 1000, runAsGroup: 2000}
"#,
        );
        validate(&pod).expect("valid");
        let dir = PathBuf::from("/var/lib/beemesh/volumes/u_7");
        let c = ctx(&dir);
        let plan = pod_plan(&pod, &c).expect("pod plan");
        assert_eq!(plan.name, "team_web_01234567_7");
        assert_eq!(plan.hostname, "web");
        assert_eq!(plan.labels[labels::EPOCH], "7");
        assert_eq!(plan.ports.len(), 2);
        assert_eq!(plan.ports[1].protocol, Protocol::Udp);
        let spec = pod.spec.as_ref().expect("spec");
        let cp =
            container_plan(&pod, &spec.containers[0], ContainerKind::App, 2, &c).expect("plan");
        assert_eq!(cp.name, "team_web_01234567_7_main_2");
        assert_eq!(
            cp.args,
            Some(vec!["echo hello world 10.88.0.9".to_string()])
        );
        let env: BTreeMap<_, _> = cp.env.iter().cloned().collect();
        assert_eq!(env["APP"], "web");
        assert_eq!(env["HOST"], "");
        assert_eq!(cp.mounts[1].host_path, dir.join("data/nested/dir"));
        assert!(cp.mounts[1].read_only);
        assert_eq!(cp.memory_limit_bytes, Some(64 << 20));
        assert_eq!(cp.cpu_limit_millis, Some(250));
        assert_eq!(cp.user.as_deref(), Some("1000:2000"));
        assert_eq!(cp.labels[labels::ATTEMPT], "2");
        assert_eq!(cp.labels[labels::CONTAINER_KIND], "app");
        assert_eq!(cp.stop_timeout_secs, 3);
        assert_eq!(host_ports(&pod), vec![5353, 8080]);
        assert_eq!(empty_dirs(&pod), vec!["data".to_string()]);
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("spec: {containers: []}", "spec.containers"),
            ("spec: {containers: [{name: c}]}", "spec.containers[0].image"),
            ("spec: {containers: [{name: C, image: i}]}", "spec.containers[0].name"),
            ("spec: {containers: [{name: c, image: i}, {name: c, image: i}]}", "spec.containers[1].name"),
            ("spec: {hostNetwork: true, containers: [{name: c, image: i}]}", "spec.hostNetwork"),
            ("spec: {restartPolicy: Sometimes, containers: [{name: c, image: i}]}", "spec.restartPolicy"),
            ("spec: {volumes: [{name: h, hostPath: {path: /}}], containers: [{name: c, image: i}]}", "spec.volumes[0].hostPath"),
            ("spec: {volumes: [{name: s, secret: {secretName: x}}], containers: [{name: c, image: i}]}", "spec.volumes[0]"),
            ("spec: {containers: [{name: c, image: i, volumeMounts: [{name: nope, mountPath: /x}]}]}", "spec.containers[0].volumeMounts[0].name"),
            ("spec: {volumes: [{name: d, emptyDir: {}}], containers: [{name: c, image: i, volumeMounts: [{name: d, mountPath: /x, subPath: ../up}]}]}", "spec.containers[0].volumeMounts[0].subPath"),
            ("spec: {containers: [{name: c, image: i, lifecycle: {preStop: {exec: {command: [x]}}}}]}", "spec.containers[0].lifecycle"),
            ("spec: {containers: [{name: c, image: i, livenessProbe: {grpc: {port: 1}}}]}", "spec.containers[0].livenessProbe.grpc"),
            ("spec: {containers: [{name: c, image: i, envFrom: [{configMapRef: {name: x}}]}]}", "spec.containers[0].envFrom"),
            ("spec: {containers: [{name: c, image: i, env: [{name: X, valueFrom: {secretKeyRef: {name: s, key: k}}}]}]}", "spec.containers[0].env[0].valueFrom.secretKeyRef"),
            ("spec: {containers: [{name: c, image: i, env: [{name: X, valueFrom: {fieldRef: {fieldPath: spec.weird}}}]}]}", "spec.containers[0].env[0].valueFrom.fieldRef.fieldPath"),
            ("spec: {containers: [{name: c, image: i, resources: {limits: {cpu: lots}}}]}", "spec.containers[0].resources.limits.cpu"),
            ("spec: {containers: [{name: c, image: i, ports: [{containerPort: 1, protocol: SCTP}]}]}", "spec.containers[0].ports[0].protocol"),
            ("spec: {initContainers: [{name: s, image: i, restartPolicy: Always}], containers: [{name: c, image: i}]}", "spec.initContainers[0].restartPolicy"),
            ("spec: {imagePullSecrets: [{name: r}], containers: [{name: c, image: i}]}", "spec.imagePullSecrets"),
        ];
        for (spec, field) in cases {
            let pod = pod_from(&format!("metadata: {{name: p, uid: u}}\n{spec}"));
            let e = validate(&pod).expect_err(spec);
            assert_eq!(e.field, field, "{spec}: {e}");
        }
        assert_eq!(validate(&pod_from(BASE)), Ok(()));
        let mut no_uid = pod_from(BASE);
        no_uid.metadata.uid = None;
        assert_eq!(validate(&no_uid).expect_err("uid").field, "metadata.uid");
    }

    #[test]
    fn an_api_server_pod_validates_once_its_token_volume_is_gone() {
        let text = include_str!("../../tests/fixtures/k3s-1.21-api/pods-list-fieldselector.json");
        let list: serde_json::Value = serde_json::from_str(text).expect("fixture json");
        let item = list["items"][0].clone();
        let mut pod: Pod = serde_json::from_value(item).expect("fixture pod");
        let e = validate(&pod).expect_err("token volume refused for now");
        assert!(e.message.contains("service-account token"), "{e}");
        let spec = pod.spec.as_mut().expect("spec");
        spec.volumes
            .as_mut()
            .expect("volumes")
            .retain(|v| !v.name.starts_with("kube-api-access-"));
        for c in &mut spec.containers {
            if let Some(mounts) = c.volume_mounts.as_mut() {
                mounts.retain(|m| !m.name.starts_with("kube-api-access-"));
            }
        }
        assert_eq!(validate(&pod), Ok(()));
    }
}
