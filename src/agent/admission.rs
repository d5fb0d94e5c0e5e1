//! The agent's own admission policy: which pods this host agrees to run.
//!
//! An agent may belong to someone other than the cluster's owner, so it cannot rely on
//! the cluster's admission control: every assignment is checked here before anything of
//! it runs, and a refusal names the rule that refused it. The levels follow the
//! Kubernetes Pod Security Standards (`privileged`, `baseline`, `restricted`, checked
//! as the pod-security-admission library checks them); on top of them come host port
//! ranges, an image allow-list and per-owner quotas. The default is `baseline` with host
//! ports 1024-65535: the standard forbids host ports, but they are how BeeMesh pods are
//! reached, so only the privileged range is kept out (`hostPorts: []` gives the strict
//! standard).
//!
//! Pure: a [`Policy`] is parsed from the agent's `--policy-file` (YAML) and checks pods;
//! the agent calls [`Policy::admit`] on every assignment (and on every pod it finds
//! again after a restart) and [`Policy::quota`] before bidding.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, Pod, PodSecurityContext, PodSpec, SELinuxOptions, SeccompProfile,
    SecurityContext, WindowsSecurityContextOptions,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use libp2p::PeerId;
use serde::Deserialize;

use crate::runtime::image_ref::normalize_image;
use crate::runtime::translate;
use crate::wire::{PodUid, Resources, POLICY_REFUSAL};

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read the policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("policy file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// A Pod Security Standards level.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// No checks of the pod's security settings (host ports, images and quotas still
    /// apply).
    Privileged,
    #[default]
    Baseline,
    Restricted,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        })
    }
}

/// Why a pod may not run on this agent: the rule, the field, what is wrong. Shown to
/// users in the pod status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{POLICY_REFUSAL}, rule {rule}: {field}: {message}")]
pub struct Refusal {
    /// `<level>:<check>` for a Pod Security Standards check (the standard's names),
    /// else `hostPorts`, `images` or `quota:<resource>`.
    pub rule: String,
    pub field: String,
    pub message: String,
}

impl Refusal {
    fn new(rule: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal {
            rule: rule.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What one owner may use on this agent at most; unset means no limit beyond the
/// agent's capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub pods: Option<u64>,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
}

/// The policy an agent enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub level: Level,
    /// Host ports pods may bind; empty: none.
    pub host_ports: Vec<RangeInclusive<u16>>,
    /// Prefixes of the (normalized) image references pods may run; empty: any image.
    pub images: Vec<String>,
    /// For owners without a quota of their own.
    pub default_quota: Quota,
    pub owner_quotas: BTreeMap<PeerId, Quota>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            level: Level::Baseline,
            host_ports: vec![DEFAULT_HOST_PORTS],
            images: Vec::new(),
            default_quota: Quota::default(),
            owner_quotas: BTreeMap::new(),
        }
    }
}

/// Ports below 1024 are the host's own services'.
const DEFAULT_HOST_PORTS: RangeInclusive<u16> = 1024..=65535;

/// The capabilities the baseline level lets a container add (the runtime's defaults).
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// SELinux types the baseline level allows (empty: the runtime's default).
const SELINUX_TYPES: [&str; 5] = [
    "",
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

const APPARMOR_ANNOTATION: &str = "container.apparmor.security.beta.kubernetes.io/";

/// The policy file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PolicyFile {
    #[serde(default)]
    level: Level,
    host_ports: Option<Vec<PortRange>>,
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    quotas: QuotasFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotasFile {
    #[serde(default)]
    default: QuotaFile,
    #[serde(default)]
    owners: BTreeMap<String, QuotaFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaFile {
    pods: Option<u64>,
    cpu: Option<Quantity>,
    memory: Option<Quantity>,
}

/// `8080` or `30000-32767`, as a number or a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortRange {
    Port(u16),
    Range(String),
}

impl Policy {
    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::from_yaml(&text).map_err(|message| PolicyError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses a policy; the error says which field is wrong and why.
    pub fn from_yaml(text: &str) -> Result<Policy, String> {
        // An empty file is the default policy, as an empty mapping is.
        let file: PolicyFile = if text.trim().is_empty() {
            PolicyFile::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| e.to_string())?
        };
        let host_ports = match file.host_ports {
            None => vec![DEFAULT_HOST_PORTS],
            Some(ranges) => ranges
                .iter()
                .map(parse_port_range)
                .collect::<Result<_, _>>()?,
        };
        for (index, prefix) in file.images.iter().enumerate() {
            if prefix.trim().is_empty() || prefix.chars().any(char::is_whitespace) {
                return Err(format!(
                    "images[{index}]: {prefix:?} is not an image reference prefix"
                ));
            }
        }
        let default_quota = quota(&file.quotas.default, "quotas.default")?;
        let mut owner_quotas = BTreeMap::new();
        for (owner, limits) in &file.quotas.owners {
            let peer = PeerId::from_str(owner)
                .map_err(|e| format!("quotas.owners: {owner:?} is not a peer ID: {e}"))?;
            owner_quotas.insert(peer, quota(limits, &format!("quotas.owners.{owner}"))?);
        }
        Ok(Policy {
            level: file.level,
            host_ports,
            images: file.images,
            default_quota,
            owner_quotas,
        })
    }

    /// Whether this agent runs the pod at all; the first rule it breaks otherwise.
    pub fn admit(&self, pod: &Pod) -> Result<(), Refusal> {
        let Some(spec) = pod.spec.as_ref() else {
            return Ok(());
        };
        if self.level >= Level::Baseline {
            baseline(pod, spec)?;
        }
        if self.level >= Level::Restricted {
            restricted(spec)?;
        }
        self.check_host_ports(spec)?;
        self.check_images(spec)
    }

    /// Whether an owner already using `used` here may add a pod requesting `requests`.
    pub fn quota(
        &self,
        owner: &PeerId,
        used: Resources,
        requests: Resources,
    ) -> Result<(), Refusal> {
        let quota = self.owner_quotas.get(owner).unwrap_or(&self.default_quota);
        let checks = [
            ("pods", quota.pods, used.pods, 1, "pods"),
            (
                "cpu",
                quota.cpu_millis,
                used.cpu_millis,
                requests.cpu_millis,
                "millicores",
            ),
            (
                "memory",
                quota.memory_bytes,
                used.memory_bytes,
                requests.memory_bytes,
                "bytes",
            ),
        ];
        for (resource, limit, used, wanted, unit) in checks {
            let Some(limit) = limit else { continue };
            if used.saturating_add(wanted) > limit {
                return Err(Refusal::new(
                    format!("quota:{resource}"),
                    "owner",
                    format!(
                        "owner {owner} uses {used} of its {limit} {unit} here and the pod \
                         asks for {wanted} more"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The reference Podman is given for an image. With an allow-list, the normalized
    /// one that was checked: a short name must not resolve through Podman's search
    /// registries to an image the list does not allow.
    pub fn runtime_image(&self, image: &str) -> String {
        if self.images.is_empty() {
            image.to_string()
        } else {
            normalize_image(image)
        }
    }

    fn check_host_ports(&self, spec: &PodSpec) -> Result<(), Refusal> {
        for (path, container) in containers(spec) {
            for (index, port) in container.ports.iter().flatten().enumerate() {
                let Some(host_port) = port.host_port.filter(|&p| p != 0) else {
                    continue;
                };
                let allowed = u16::try_from(host_port)
                    .is_ok_and(|p| self.host_ports.iter().any(|range| range.contains(&p)));
                if !allowed {
                    return Err(Refusal::new(
                        "hostPorts",
                        format!("{path}.ports[{index}].hostPort"),
                        format!(
                            "host port {host_port} is not allowed on this agent (allowed: {})",
                            describe_ranges(&self.host_ports)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_images(&self, spec: &PodSpec) -> Result<(), Refusal> {
        if self.images.is_empty() {
            return Ok(());
        }
        for (path, container) in containers(spec) {
            let image = container.image.as_deref().unwrap_or_default();
            let normalized = normalize_image(image);
            if !self
                .images
                .iter()
                .any(|prefix| has_prefix(&normalized, prefix))
            {
                return Err(Refusal::new(
                    "images",
                    format!("{path}.image"),
                    format!(
                        "image {normalized:?} is not in this agent's allow-list ({})",
                        self.images.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Pods whose spec this agent's policy refused, by spec digest: no bid goes out for
/// them again, so that an owner does not offer, assign and hear the same "no" every
/// second. Bounded; the oldest refusal is forgotten first.
#[derive(Debug, Default)]
pub struct RefusedSpecs {
    digests: HashMap<PodUid, String>,
    order: VecDeque<PodUid>,
}

/// Refusals remembered at most (offers come from trusted owners only).
const MAX_REFUSED_SPECS: usize = 4096;

impl RefusedSpecs {
    pub fn insert(&mut self, uid: PodUid, spec_digest: String) {
        if self.digests.insert(uid.clone(), spec_digest).is_none() {
            self.order.push_back(uid);
        }
        while self.order.len() > MAX_REFUSED_SPECS {
            if let Some(oldest) = self.order.pop_front() {
                self.digests.remove(&oldest);
            }
        }
    }

    pub fn contains(&self, uid: &PodUid, spec_digest: &str) -> bool {
        self.digests.get(uid).is_some_and(|d| d == spec_digest)
    }
}

fn quota(file: &QuotaFile, path: &str) -> Result<Quota, String> {
    let cpu_millis = file
        .cpu
        .as_ref()
        .map(|q| translate::parse_cpu_millis(q).map_err(|e| format!("{path}.cpu: {e}")))
        .transpose()?;
    let memory_bytes = file
        .memory
        .as_ref()
        .map(|q| translate::parse_memory_bytes(q).map_err(|e| format!("{path}.memory: {e}")))
        .transpose()?;
    Ok(Quota {
        pods: file.pods,
        cpu_millis,
        memory_bytes,
    })
}

fn parse_port_range(range: &PortRange) -> Result<RangeInclusive<u16>, String> {
    let port = |text: &str| {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("hostPorts: {text:?} is not a port (1-65535)"))
    };
    match range {
        PortRange::Port(0) => Err("hostPorts: 0 is not a port (1-65535)".into()),
        PortRange::Port(p) => Ok(*p..=*p),
        PortRange::Range(text) => {
            let (low, high) = match text.split_once('-') {
                Some((low, high)) => (port(low)?, port(high)?),
                None => (port(text)?, port(text)?),
            };
            if low > high {
                return Err(format!("hostPorts: {text:?} is an empty range"));
            }
            Ok(low..=high)
        }
    }
}

fn describe_ranges(ranges: &[RangeInclusive<u16>]) -> String {
    if ranges.is_empty() {
        return "none".into();
    }
    ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every container the pod runs with its field path, ephemeral ones (`kubectl debug`)
/// included: the policy holds for them as for the rest.
fn containers(spec: &PodSpec) -> Vec<(String, Cow<'_, Container>)> {
    let init = spec.init_containers.iter().flatten().enumerate();
    let app = spec.containers.iter().enumerate();
    let ephemeral = translate::ephemeral_containers(spec)
        .into_iter()
        .enumerate();
    init.map(|(i, c)| (format!("spec.initContainers[{i}]"), Cow::Borrowed(c)))
        .chain(app.map(|(i, c)| (format!("spec.containers[{i}]"), Cow::Borrowed(c))))
        .chain(ephemeral.map(|(i, c)| (format!("spec.ephemeralContainers[{i}]"), Cow::Owned(c))))
        .collect()
}

fn security(container: &Container) -> Option<&SecurityContext> {
    container.security_context.as_ref()
}

/// The Pod Security Standards' baseline checks.
fn baseline(pod: &Pod, spec: &PodSpec) -> Result<(), Refusal> {
    const LEVEL: &str = "baseline";
    let rule = |check: &str| format!("{LEVEL}:{check}");
    let host_namespaces = [
        (spec.host_network, "spec.hostNetwork"),
        (spec.host_pid, "spec.hostPID"),
        (spec.host_ipc, "spec.hostIPC"),
    ];
    for (set, field) in host_namespaces {
        if set == Some(true) {
            return Err(Refusal::new(
                rule("hostNamespaces"),
                field,
                "the host's namespaces are not shared with pods",
            ));
        }
    }
    for (index, volume) in spec.volumes.iter().flatten().enumerate() {
        if volume.host_path.is_some() {
            return Err(Refusal::new(
                rule("hostPathVolumes"),
                format!("spec.volumes[{index}].hostPath"),
                "hostPath volumes would expose the agent's files",
            ));
        }
    }
    let pod_security = spec.security_context.as_ref();
    if let Some(pod_security) = pod_security {
        check_pod_confinement(pod_security, &rule)?;
    }
    for (name, value) in pod.metadata.annotations.iter().flatten() {
        if name.starts_with(APPARMOR_ANNOTATION)
            && value != "runtime/default"
            && !value.starts_with("localhost/")
        {
            return Err(Refusal::new(
                rule("appArmorProfile"),
                format!("metadata.annotations[{name}]"),
                format!("AppArmor profile {value:?} is not allowed"),
            ));
        }
    }
    for (path, container) in containers(spec) {
        let Some(security) = security(&container) else {
            continue;
        };
        let path = format!("{path}.securityContext");
        if security.privileged == Some(true) {
            return Err(Refusal::new(
                rule("privileged"),
                format!("{path}.privileged"),
                "privileged containers are not allowed",
            ));
        }
        let added = security.capabilities.as_ref().and_then(|c| c.add.as_ref());
        if let Some(cap) = added
            .into_iter()
            .flatten()
            .find(|cap| !BASELINE_CAPABILITIES.contains(&cap.as_str()))
        {
            return Err(Refusal::new(
                rule("capabilities_baseline"),
                format!("{path}.capabilities.add"),
                format!("capability {cap:?} is not allowed (allowed: the runtime's defaults)"),
            ));
        }
        if security
            .proc_mount
            .as_deref()
            .is_some_and(|m| m != "Default")
        {
            return Err(Refusal::new(
                rule("procMount"),
                format!("{path}.procMount"),
                "only the Default /proc mount is allowed",
            ));
        }
        check_confinement(
            &path,
            security.seccomp_profile.as_ref(),
            security
                .app_armor_profile
                .as_ref()
                .map(|p| p.type_.as_str()),
            security.se_linux_options.as_ref(),
            security.windows_options.as_ref(),
            &rule,
        )?;
    }
    Ok(())
}

fn check_pod_confinement(
    security: &PodSecurityContext,
    rule: &dyn Fn(&str) -> String,
) -> Result<(), Refusal> {
    const PATH: &str = "spec.securityContext";
    if let Some(sysctl) = security
        .sysctls
        .iter()
        .flatten()
        // The baseline level allows the kubelet's safe sysctls.
        .find(|s| !translate::SAFE_SYSCTLS.contains(&s.name.as_str()))
    {
        return Err(Refusal::new(
            rule("sysctls"),
            format!("{PATH}.sysctls"),
            format!("sysctl {:?} is not allowed", sysctl.name),
        ));
    }
    check_confinement(
        PATH,
        security.seccomp_profile.as_ref(),
        security
            .app_armor_profile
            .as_ref()
            .map(|p| p.type_.as_str()),
        security.se_linux_options.as_ref(),
        security.windows_options.as_ref(),
        rule,
    )
}

/// Seccomp, AppArmor, SELinux and Windows settings, of the pod or of one container.
fn check_confinement(
    path: &str,
    seccomp: Option<&SeccompProfile>,
    app_armor: Option<&str>,
    se_linux: Option<&SELinuxOptions>,
    windows: Option<&WindowsSecurityContextOptions>,
    rule: &dyn Fn(&str) -> String,
) -> Result<(), Refusal> {
    if windows.and_then(|w| w.host_process) == Some(true) {
        return Err(Refusal::new(
            rule("windowsHostProcess"),
            format!("{path}.windowsOptions.hostProcess"),
            "host processes are not allowed",
        ));
    }
    if seccomp.is_some_and(|p| p.type_ == "Unconfined") {
        return Err(Refusal::new(
            rule("seccompProfile_baseline"),
            format!("{path}.seccompProfile.type"),
            "an Unconfined seccomp profile is not allowed",
        ));
    }
    if app_armor == Some("Unconfined") {
        return Err(Refusal::new(
            rule("appArmorProfile"),
            format!("{path}.appArmorProfile.type"),
            "an Unconfined AppArmor profile is not allowed",
        ));
    }
    if let Some(options) = se_linux {
        let type_ok = SELINUX_TYPES.contains(&options.type_.as_deref().unwrap_or_default());
        let custom = options.user.as_deref().is_some_and(|u| !u.is_empty())
            || options.role.as_deref().is_some_and(|r| !r.is_empty());
        if !type_ok || custom {
            return Err(Refusal::new(
                rule("seLinuxOptions"),
                format!("{path}.seLinuxOptions"),
                "only the container SELinux types are allowed, without a user or role",
            ));
        }
    }
    Ok(())
}

/// The Pod Security Standards' restricted checks, on top of the baseline's.
fn restricted(spec: &PodSpec) -> Result<(), Refusal> {
    const LEVEL: &str = "restricted";
    let rule = |check: &str| format!("{LEVEL}:{check}");
    for (index, volume) in spec.volumes.iter().flatten().enumerate() {
        let allowed = volume.config_map.is_some()
            || volume.csi.is_some()
            || volume.downward_api.is_some()
            || volume.empty_dir.is_some()
            || volume.ephemeral.is_some()
            || volume.persistent_volume_claim.is_some()
            || volume.projected.is_some()
            || volume.secret.is_some();
        if !allowed {
            return Err(Refusal::new(
                rule("volumeTypes"),
                format!("spec.volumes[{index}]"),
                format!(
                    "volume {:?} is of a type the restricted level does not allow",
                    volume.name
                ),
            ));
        }
    }
    let pod_security = spec.security_context.as_ref();
    let pod_non_root = pod_security.and_then(|s| s.run_as_non_root);
    let pod_seccomp = pod_security.and_then(|s| s.seccomp_profile.as_ref());
    if pod_security.and_then(|s| s.run_as_user) == Some(0) {
        return Err(Refusal::new(
            rule("runAsUser"),
            "spec.securityContext.runAsUser",
            "containers may not run as user 0",
        ));
    }
    if pod_non_root == Some(false) {
        return Err(Refusal::new(
            rule("runAsNonRoot"),
            "spec.securityContext.runAsNonRoot",
            "must not be false",
        ));
    }
    for (path, container) in containers(spec) {
        let security = security(&container);
        let path = format!("{path}.securityContext");
        if security.and_then(|s| s.allow_privilege_escalation) != Some(false) {
            return Err(Refusal::new(
                rule("allowPrivilegeEscalation"),
                format!("{path}.allowPrivilegeEscalation"),
                "must be set to false",
            ));
        }
        match security.and_then(|s| s.run_as_non_root).or(pod_non_root) {
            Some(true) => {}
            _ => {
                return Err(Refusal::new(
                    rule("runAsNonRoot"),
                    format!("{path}.runAsNonRoot"),
                    "must be true (on the container or the pod)",
                ))
            }
        }
        if security.and_then(|s| s.run_as_user) == Some(0) {
            return Err(Refusal::new(
                rule("runAsUser"),
                format!("{path}.runAsUser"),
                "containers may not run as user 0",
            ));
        }
        let seccomp = security
            .and_then(|s| s.seccomp_profile.as_ref())
            .or(pod_seccomp);
        if !seccomp.is_some_and(|p| matches!(p.type_.as_str(), "RuntimeDefault" | "Localhost")) {
            return Err(Refusal::new(
                rule("seccompProfile_restricted"),
                format!("{path}.seccompProfile.type"),
                "must be RuntimeDefault or Localhost (on the container or the pod)",
            ));
        }
        check_restricted_capabilities(security.and_then(|s| s.capabilities.as_ref())).map_err(
            |message| {
                Refusal::new(
                    rule("capabilities_restricted"),
                    format!("{path}.capabilities"),
                    message,
                )
            },
        )?;
    }
    Ok(())
}

fn check_restricted_capabilities(caps: Option<&Capabilities>) -> Result<(), String> {
    let drops_all = caps
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|cap| cap == "ALL"));
    if !drops_all {
        return Err("must drop ALL".into());
    }
    let added = caps.and_then(|c| c.add.as_ref()).into_iter().flatten();
    match added.into_iter().find(|cap| *cap != "NET_BIND_SERVICE") {
        Some(cap) => Err(format!("may add only NET_BIND_SERVICE, not {cap:?}")),
        None => Ok(()),
    }
}

/// Whether an allow-list entry covers a reference: whole components only, so that
/// `quay.io` does not allow `quay.io.example.com/x`, nor `docker.io/library/ng` `nginx`.
fn has_prefix(reference: &str, prefix: &str) -> bool {
    match reference.strip_prefix(prefix) {
        None => false,
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with(['/', ':', '@']),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u1"},
            "spec": spec,
        }))
        .expect("pod")
    }

    fn simple(container: serde_json::Value) -> Pod {
        let mut c = json!({"name": "c", "image": "localhost/busybox:1.35"});
        if let (Some(c), Some(extra)) = (c.as_object_mut(), container.as_object()) {
            c.extend(extra.clone());
        }
        pod(json!({"containers": [c]}))
    }

    fn rule_of(policy: &Policy, pod: &Pod) -> Option<String> {
        policy.admit(pod).err().map(|r| r.rule)
    }

    fn restricted_ok() -> serde_json::Value {
        json!({"securityContext": {
            "allowPrivilegeEscalation": false,
            "runAsNonRoot": true,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
            "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
        }})
    }

    #[test]
    fn default_policy_is_baseline_with_unprivileged_host_ports() {
        let policy = Policy::from_yaml("").expect("empty file");
        assert_eq!(policy, Policy::default());
        assert_eq!(policy.admit(&simple(json!({}))), Ok(()));
        let port = |p: i32| simple(json!({"ports": [{"containerPort": 80, "hostPort": p}]}));
        assert_eq!(policy.admit(&port(8080)), Ok(()));
        let refusal = policy.admit(&port(22)).expect_err("port 22");
        assert_eq!(refusal.rule, "hostPorts");
        assert_eq!(refusal.field, "spec.containers[0].ports[0].hostPort");
        assert_eq!(
            refusal.to_string(),
            "refused by the agent's policy, rule hostPorts: spec.containers[0].ports[0].hostPort: \
             host port 22 is not allowed on this agent (allowed: 1024-65535)"
        );
    }

    #[test]
    fn an_ephemeral_container_is_held_to_the_policy_as_any_other() {
        let debugged = |security: serde_json::Value| {
            pod(json!({
                "containers": [{"name": "c", "image": "localhost/busybox:1.35"}],
                "ephemeralContainers": [{"name": "debugger", "image": "localhost/busybox:1.35",
                                         "targetContainerName": "c", "securityContext": security}]
            }))
        };
        let policy = Policy::default();
        assert_eq!(policy.admit(&debugged(json!({}))), Ok(()));
        let refusal = policy
            .admit(&debugged(json!({"privileged": true})))
            .expect_err("a privileged debugger");
        assert_eq!(
            (refusal.rule.as_str(), refusal.field.as_str()),
            (
                "baseline:privileged",
                "spec.ephemeralContainers[0].securityContext.privileged"
            )
        );
    }

    #[test]
    fn baseline_refuses_each_escape_naming_its_rule() {
        let policy = Policy::default();
        let cases = [
            (
                simple(json!({"securityContext": {"privileged": true}})),
                "baseline:privileged",
            ),
            (
                simple(json!({"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}})),
                "baseline:capabilities_baseline",
            ),
            (
                simple(json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}}})),
                "baseline:seccompProfile_baseline",
            ),
            (
                pod(
                    json!({"securityContext": {"seccompProfile": {"type": "Unconfined"}},
                           "containers": [{"name": "c", "image": "x"}]}),
                ),
                "baseline:seccompProfile_baseline",
            ),
            (
                simple(json!({"securityContext": {"appArmorProfile": {"type": "Unconfined"}}})),
                "baseline:appArmorProfile",
            ),
            (
                simple(json!({"securityContext": {"procMount": "Unmasked"}})),
                "baseline:procMount",
            ),
            (
                simple(json!({"securityContext": {"seLinuxOptions": {"type": "spc_t"}}})),
                "baseline:seLinuxOptions",
            ),
            (
                pod(json!({"hostNetwork": true, "containers": [{"name": "c", "image": "x"}]})),
                "baseline:hostNamespaces",
            ),
            (
                pod(json!({"hostPID": true, "containers": [{"name": "c", "image": "x"}]})),
                "baseline:hostNamespaces",
            ),
            (
                pod(
                    json!({"volumes": [{"name": "h", "hostPath": {"path": "/"}}],
                           "containers": [{"name": "c", "image": "x"}]}),
                ),
                "baseline:hostPathVolumes",
            ),
            (
                pod(
                    json!({"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
                           "containers": [{"name": "c", "image": "x"}]}),
                ),
                "baseline:sysctls",
            ),
            (
                pod(json!({"initContainers": [{"name": "i", "image": "x",
                            "securityContext": {"privileged": true}}],
                           "containers": [{"name": "c", "image": "x"}]})),
                "baseline:privileged",
            ),
        ];
        for (pod, rule) in cases {
            assert_eq!(rule_of(&policy, &pod).as_deref(), Some(rule), "{pod:?}");
        }
        let mut annotated = simple(json!({}));
        annotated.metadata.annotations = Some(BTreeMap::from([(
            format!("{APPARMOR_ANNOTATION}c"),
            "unconfined".to_string(),
        )]));
        assert_eq!(
            rule_of(&policy, &annotated).as_deref(),
            Some("baseline:appArmorProfile")
        );
    }

    #[test]
    fn baseline_allows_what_the_standard_allows() {
        let policy = Policy::default();
        let allowed = [
            simple(
                json!({"securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "CHOWN"]}}}),
            ),
            simple(json!({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}})),
            simple(json!({"securityContext": {"privileged": false, "procMount": "Default"}})),
            simple(json!({"securityContext": {"seLinuxOptions": {"type": "container_t"}}})),
            pod(
                json!({"securityContext": {"sysctls": [{"name": "net.ipv4.tcp_syncookies", "value": "1"}]},
                       "containers": [{"name": "c", "image": "x"}]}),
            ),
        ];
        for pod in allowed {
            assert_eq!(policy.admit(&pod), Ok(()), "{pod:?}");
        }
        let privileged = Policy::from_yaml("level: privileged").expect("policy");
        assert_eq!(
            privileged.admit(&simple(json!({"securityContext": {"privileged": true}}))),
            Ok(())
        );
    }

    #[test]
    fn restricted_needs_every_hardening() {
        let policy = Policy::from_yaml("level: restricted").expect("policy");
        assert_eq!(policy.admit(&simple(restricted_ok())), Ok(()));
        let without = |field: &str| {
            let mut container = restricted_ok();
            if let Some(security) = container["securityContext"].as_object_mut() {
                security.remove(field);
            }
            rule_of(&policy, &simple(container))
        };
        assert_eq!(
            without("allowPrivilegeEscalation").as_deref(),
            Some("restricted:allowPrivilegeEscalation")
        );
        assert_eq!(
            without("runAsNonRoot").as_deref(),
            Some("restricted:runAsNonRoot")
        );
        assert_eq!(
            without("seccompProfile").as_deref(),
            Some("restricted:seccompProfile_restricted")
        );
        assert_eq!(
            without("capabilities").as_deref(),
            Some("restricted:capabilities_restricted")
        );
        let mut root = restricted_ok();
        root["securityContext"]["runAsUser"] = json!(0);
        assert_eq!(
            rule_of(&policy, &simple(root)).as_deref(),
            Some("restricted:runAsUser")
        );
        let mut chown = restricted_ok();
        chown["securityContext"]["capabilities"]["add"] = json!(["CHOWN"]);
        assert_eq!(
            rule_of(&policy, &simple(chown)).as_deref(),
            Some("restricted:capabilities_restricted")
        );
        // Set once on the pod, for every container.
        let pod_level = pod(json!({
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "image": "x", "securityContext": {
                "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}],
        }));
        assert_eq!(policy.admit(&pod_level), Ok(()));
        // Baseline checks still apply.
        let mut privileged = restricted_ok();
        privileged["securityContext"]["privileged"] = json!(true);
        assert_eq!(
            rule_of(&policy, &simple(privileged)).as_deref(),
            Some("baseline:privileged")
        );
    }

    #[test]
    fn images_are_matched_normalized_and_by_whole_components() {
        let policy = Policy::from_yaml(
            "images: [docker.io/library/nginx, quay.io, 'ghcr.io/acme/', localhost/busybox]",
        )
        .expect("policy");
        let image = |name: &str| simple(json!({"image": name}));
        for allowed in [
            "nginx",
            "nginx:1.25",
            "docker.io/library/nginx@sha256:abc",
            "library/nginx",
            "quay.io/x/y:1",
            "ghcr.io/acme/tool",
            "localhost/busybox:1.35",
        ] {
            assert_eq!(policy.admit(&image(allowed)), Ok(()), "{allowed}");
        }
        for refused in [
            "nginx-evil",
            "evil/nginx",
            "quay.io.example.com/x",
            "ghcr.io/acmeevil/tool",
            "busybox",
            "localhost/busyboxer",
        ] {
            assert_eq!(
                rule_of(&policy, &image(refused)).as_deref(),
                Some("images"),
                "{refused}"
            );
        }
        assert_eq!(
            policy.runtime_image("nginx:1.25"),
            "docker.io/library/nginx:1.25"
        );
        assert_eq!(Policy::default().runtime_image("nginx:1.25"), "nginx:1.25");
    }

    #[test]
    fn quotas_apply_per_owner_with_a_default() {
        let owner = PeerId::random();
        let other = PeerId::random();
        let policy = Policy::from_yaml(&format!(
            "quotas:\n  default: {{pods: 2, cpu: 500m}}\n  owners:\n    {owner}: {{memory: 1Gi}}\n"
        ))
        .expect("policy");
        let requests = |cpu: u64, memory: u64| Resources {
            cpu_millis: cpu,
            memory_bytes: memory,
            pods: 1,
        };
        let used = |pods: u64, cpu: u64, memory: u64| Resources {
            pods,
            cpu_millis: cpu,
            memory_bytes: memory,
        };
        assert_eq!(
            policy.quota(&other, used(1, 200, 0), requests(300, 0)),
            Ok(())
        );
        let cpu = policy
            .quota(&other, used(1, 300, 0), requests(300, 0))
            .expect_err("cpu");
        assert_eq!(cpu.rule, "quota:cpu");
        assert!(
            cpu.message.contains("uses 300 of its 500 millicores"),
            "{cpu}"
        );
        assert_eq!(
            policy
                .quota(&other, used(2, 0, 0), requests(0, 0))
                .map_err(|r| r.rule),
            Err("quota:pods".to_string())
        );
        // The owner's own quota replaces the default.
        assert_eq!(
            policy.quota(&owner, used(10, 9000, 0), requests(1000, 1 << 29)),
            Ok(())
        );
        assert_eq!(
            policy
                .quota(&owner, used(0, 0, 1 << 30), requests(0, 1))
                .map_err(|r| r.rule),
            Err("quota:memory".to_string())
        );
    }

    #[test]
    fn the_shipped_examples_parse() {
        let example = Policy::from_yaml(include_str!("../../packaging/policy/example.yaml"))
            .expect("example.yaml");
        assert_eq!(example.host_ports, vec![8000..=8999, 30080..=30080]);
        assert_eq!(example.owner_quotas.len(), 1);
        let restricted = Policy::from_yaml(include_str!("../../packaging/policy/restricted.yaml"))
            .expect("restricted.yaml");
        assert_eq!(restricted.level, Level::Restricted);
        assert!(restricted.host_ports.is_empty());
    }

    #[test]
    fn refused_specs_are_bounded_and_per_digest() {
        let mut refused = RefusedSpecs::default();
        let uid = |i: usize| PodUid(format!("uid-{i}"));
        refused.insert(uid(0), "a".into());
        assert!(refused.contains(&uid(0), "a"));
        // A changed spec is asked again.
        assert!(!refused.contains(&uid(0), "b"));
        for i in 1..=MAX_REFUSED_SPECS {
            refused.insert(uid(i), "a".into());
        }
        assert!(!refused.contains(&uid(0), "a"), "the oldest is forgotten");
        assert!(refused.contains(&uid(MAX_REFUSED_SPECS), "a"));
        assert_eq!(refused.digests.len(), MAX_REFUSED_SPECS);
        assert_eq!(refused.order.len(), MAX_REFUSED_SPECS);
    }

    #[test]
    fn bad_policy_files_say_what_is_wrong() {
        let cases = [
            ("level: lax", "unknown variant `lax`"),
            ("levle: baseline", "unknown field `levle`"),
            ("hostPorts: [0]", "0 is not a port"),
            ("hostPorts: ['9000-8000']", "is an empty range"),
            ("hostPorts: ['http']", "\"http\" is not a port"),
            ("images: ['']", "images[0]"),
            (
                "quotas: {owners: {bob: {pods: 1}}}",
                "\"bob\" is not a peer ID",
            ),
            ("quotas: {default: {cpu: lots}}", "quotas.default.cpu"),
            ("quotas: {default: {pods: -1}}", "quotas.default.pods"),
        ];
        for (text, expected) in cases {
            let error = Policy::from_yaml(text).expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
        let ranges = Policy::from_yaml("hostPorts: [8080, '30000-32767']").expect("ranges");
        assert_eq!(ranges.host_ports, vec![8080..=8080, 30000..=32767]);
        let none = Policy::from_yaml("hostPorts: []").expect("none");
        let refusal = none
            .admit(&simple(
                json!({"ports": [{"containerPort": 80, "hostPort": 8080}]}),
            ))
            .expect_err("no host ports");
        assert!(refusal.message.ends_with("(allowed: none)"), "{refusal}");
    }
}
