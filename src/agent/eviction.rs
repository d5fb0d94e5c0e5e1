//! Local ephemeral storage limits, enforced by eviction as the kubelet's eviction
//! manager enforces them (`localStorageEviction`): a pod is evicted when an emptyDir
//! holds more than its `sizeLimit`, when its containers and emptyDirs together use
//! more than the sum of its containers' `ephemeral-storage` limits, or when one
//! container (its writable layer and its log) uses more than its own limit. Pure: the
//! usage is measured by the caller.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::runtime::translate;

/// The status reason of an evicted pod.
pub const EVICTED: &str = "Evicted";

/// What a pod uses of the agent's disk, in bytes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Disk-backed emptyDirs, by volume name.
    pub empty_dirs: BTreeMap<String, u64>,
    /// Each container's writable layer and log, by container name.
    pub containers: BTreeMap<String, u64>,
}

/// Whether the pod has any limit [`exceeded`] checks: else its usage need not be
/// measured.
pub fn has_limits(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    spec.volumes
        .iter()
        .flatten()
        .any(|v| disk_size_limit(v).is_some())
        || spec.containers.iter().any(|c| storage_limit(c).is_some())
}

/// The `sizeLimit` of a disk-backed emptyDir (a memory-backed one is a tmpfs of that
/// size: it cannot pass it).
fn disk_size_limit(volume: &Volume) -> Option<&Quantity> {
    volume
        .empty_dir
        .as_ref()
        .filter(|e| e.medium.as_deref() != Some("Memory"))?
        .size_limit
        .as_ref()
}

fn storage_limit(container: &Container) -> Option<&Quantity> {
    container
        .resources
        .as_ref()?
        .limits
        .as_ref()?
        .get("ephemeral-storage")
}

fn bytes(quantity: &Quantity) -> Option<u64> {
    translate::parse_memory_bytes(quantity).ok()
}

/// Whether `used` (nothing when unmeasured) passes a positive `limit`.
fn over(limit: &Quantity, used: Option<&u64>) -> bool {
    bytes(limit).is_some_and(|limit| limit > 0 && used.copied().unwrap_or(0) > limit)
}

/// The kubelet's eviction message when the pod uses more than a limit allows, checked
/// in the kubelet's order; None while it fits.
pub fn exceeded(pod: &Pod, usage: &Usage) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    for volume in spec.volumes.iter().flatten() {
        let Some(limit) = disk_size_limit(volume) else {
            continue;
        };
        if over(limit, usage.empty_dirs.get(&volume.name)) {
            return Some(format!(
                "Usage of EmptyDir volume {:?} exceeds the limit {:?}. ",
                volume.name, limit.0
            ));
        }
    }
    let limits: Vec<&Quantity> = spec.containers.iter().filter_map(storage_limit).collect();
    if !limits.is_empty() {
        let total: u64 = limits.iter().filter_map(|q| bytes(q)).sum();
        let used = usage.containers.values().sum::<u64>() + usage.empty_dirs.values().sum::<u64>();
        if used > total {
            return Some(format!(
                "Pod ephemeral local storage usage exceeds the total limit of containers {}. ",
                render_bytes(total)
            ));
        }
    }
    for container in &spec.containers {
        let Some(limit) = storage_limit(container) else {
            continue;
        };
        if over(limit, usage.containers.get(&container.name)) {
            return Some(format!(
                "Container {} exceeded its local ephemeral storage limit {:?}. ",
                container.name, limit.0
            ));
        }
    }
    None
}

/// A byte count as Kubernetes writes a sum of quantities (`resource.Quantity.String`
/// of a BinarySI value): the largest binary suffix that divides it.
fn render_bytes(value: u64) -> String {
    const SUFFIXES: [(&str, u64); 6] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    SUFFIXES
        .iter()
        .find(|(_, unit)| value >= *unit && value.is_multiple_of(*unit))
        .map_or_else(
            || value.to_string(),
            |(suffix, unit)| format!("{}{suffix}", value / unit),
        )
}

/// The disk space a directory tree takes (allocated blocks, as `du` counts them),
/// without following links; what cannot be read counts nothing.
pub fn disk_usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": spec})).expect("pod")
    }

    fn usage(empty_dirs: &[(&str, u64)], containers: &[(&str, u64)]) -> Usage {
        Usage {
            empty_dirs: empty_dirs
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            containers: containers
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn an_emptydir_past_its_size_limit_evicts_with_the_kubelets_message() {
        let pod = pod(json!({
            "containers": [{"name": "app", "image": "x"}],
            "volumes": [
                {"name": "scratch", "emptyDir": {"sizeLimit": "10Mi"}},
                {"name": "ram", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
                {"name": "free", "emptyDir": {}}
            ]
        }));
        assert!(has_limits(&pod));
        assert_eq!(exceeded(&pod, &usage(&[("scratch", 10 * MIB)], &[])), None);
        assert_eq!(
            exceeded(&pod, &usage(&[("scratch", 10 * MIB + 1)], &[])).as_deref(),
            Some("Usage of EmptyDir volume \"scratch\" exceeds the limit \"10Mi\". ")
        );
    }

    #[test]
    fn containers_past_their_limits_evict_the_pod_first_by_the_pods_total() {
        let pod = pod(json!({
            "containers": [
                {"name": "a", "image": "x", "resources": {"limits": {"ephemeral-storage": "100Mi"}}},
                {"name": "b", "image": "x", "resources": {"limits": {"ephemeral-storage": "50Mi"}}}
            ],
            "volumes": [{"name": "scratch", "emptyDir": {}}]
        }));
        assert!(has_limits(&pod));
        let fits = usage(
            &[("scratch", 10 * MIB)],
            &[("a", 90 * MIB), ("b", 40 * MIB)],
        );
        assert_eq!(exceeded(&pod, &fits), None);
        // One container over its own limit, the pod within the total.
        assert_eq!(
            exceeded(&pod, &usage(&[], &[("a", 10 * MIB), ("b", 60 * MIB)])).as_deref(),
            Some("Container b exceeded its local ephemeral storage limit \"50Mi\". ")
        );
        // The pod's total, emptyDirs included, is checked before each container.
        assert_eq!(
            exceeded(&pod, &usage(&[("scratch", 100 * MIB)], &[("a", 60 * MIB)])).as_deref(),
            Some("Pod ephemeral local storage usage exceeds the total limit of containers 150Mi. ")
        );
    }

    #[test]
    fn a_pod_without_limits_is_never_measured() {
        let pod = pod(json!({"containers": [{"name": "a", "image": "x"}],
                             "volumes": [{"name": "v", "emptyDir": {}}]}));
        assert!(!has_limits(&pod));
        assert_eq!(
            exceeded(&pod, &usage(&[("v", u64::MAX / 4)], &[("a", 1 << 40)])),
            None
        );
    }

    #[test]
    fn sums_are_written_as_kubernetes_writes_quantities() {
        assert_eq!(render_bytes(150 * MIB), "150Mi");
        assert_eq!(render_bytes(3 << 30), "3Gi");
        assert_eq!(render_bytes(1536), "1536");
        assert_eq!(render_bytes(1000), "1000");
    }

    #[test]
    fn disk_usage_counts_allocated_blocks_without_following_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), vec![1u8; 64 * 1024]).expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/b"), vec![1u8; 64 * 1024]).expect("write");
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).expect("link");
        let used = disk_usage(dir.path());
        assert!((128 * 1024..1024 * 1024).contains(&used), "{used}");
    }
}
