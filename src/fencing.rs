//! Fencing: which pods must never run twice, and the lease clock that stops a copy
//! cut off from its owner before the owner places the pod again.
//!
//! A strict pod's placement holds a lease. The agent counts it from when it *sent* the
//! renewal (or received the assignment) and stops the copy when it runs out; the owner
//! counts it from when it *received* that renewal (or the assignment's answer), which
//! is never earlier, and places the pod again only after the lease plus a margin. Each
//! side measures on its own clock, so no wall-clock time is ever compared across
//! machines; the margin covers how much slower the agent's clock may run than the
//! owner's (rate, not offset) and the time the stop takes to act.

use k8s_openapi::api::core::v1::Pod;

/// Per-pod choice between never two copies and always one running.
pub const FENCING_ANNOTATION: &str = "beemesh.io/fencing";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// Never two copies: a copy cut off from its owner stops when its lease runs out,
    /// and the owner waits for that before placing the pod elsewhere.
    Strict,
    /// Availability first: a copy cut off from its owner keeps running, and the owner
    /// places the pod elsewhere as soon as it declares the agent lost.
    Relaxed,
}

/// The pod's fencing: its annotation, else strict for pods a StatefulSet owns or with
/// a persistentVolumeClaim (their identity or data must not be shared by two copies),
/// relaxed for the rest.
pub fn fencing_of(pod: &Pod) -> Result<Fencing, String> {
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FENCING_ANNOTATION));
    match annotation.map(String::as_str) {
        Some("strict") => return Ok(Fencing::Strict),
        Some("relaxed") => return Ok(Fencing::Relaxed),
        Some(other) => {
            return Err(format!(
                "metadata.annotations[{FENCING_ANNOTATION}]: {other:?} is neither \"strict\" nor \"relaxed\""
            ))
        }
        None => {}
    }
    let stateful_set = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "StatefulSet" && o.api_version.starts_with("apps/"));
    let claims = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .any(|v| v.persistent_volume_claim.is_some());
    Ok(if stateful_set || claims {
        Fencing::Strict
    } else {
        Fencing::Relaxed
    })
}

/// Milliseconds since boot, suspend included (CLOCK_BOOTTIME): the same in every
/// process of the machine, and a copy frozen by a suspend finds its lease run out as
/// soon as it wakes, where the monotonic clock would have stood still.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write; CLOCK_BOOTTIME exists on
    // every Linux since 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        // Cannot happen with a valid clock id; 0 makes every lease look run out
        // (fencing errs on the side of stopping).
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1000)
        .saturating_add(ts.tv_nsec as u64 / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimVolumeSource, PodSpec, Volume};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn pod(annotation: Option<&str>, owner_kind: Option<&str>, claim: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                annotations: annotation
                    .map(|a| [(FENCING_ANNOTATION.to_string(), a.to_string())].into()),
                owner_references: owner_kind.map(|kind| {
                    vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: kind.into(),
                        name: "web".into(),
                        uid: "1".into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            spec: Some(PodSpec {
                volumes: claim.then(|| {
                    vec![Volume {
                        name: "data".into(),
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: "data".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn stateful_set_pods_and_claims_are_strict_and_the_rest_relaxed() {
        assert_eq!(
            fencing_of(&pod(None, Some("StatefulSet"), false)),
            Ok(Fencing::Strict)
        );
        assert_eq!(fencing_of(&pod(None, None, true)), Ok(Fencing::Strict));
        assert_eq!(
            fencing_of(&pod(None, Some("ReplicaSet"), false)),
            Ok(Fencing::Relaxed)
        );
        assert_eq!(fencing_of(&pod(None, None, false)), Ok(Fencing::Relaxed));
    }

    #[test]
    fn the_annotation_decides_either_way() {
        assert_eq!(
            fencing_of(&pod(Some("relaxed"), Some("StatefulSet"), true)),
            Ok(Fencing::Relaxed)
        );
        assert_eq!(
            fencing_of(&pod(Some("strict"), None, false)),
            Ok(Fencing::Strict)
        );
        let err = fencing_of(&pod(Some("Strict"), None, false)).expect_err("case matters");
        assert!(
            err.contains("beemesh.io/fencing") && err.contains("\"Strict\""),
            "{err}"
        );
    }

    #[test]
    fn the_boot_clock_moves_forward() {
        let a = boottime_ms();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = boottime_ms();
        assert!(a > 0 && b >= a + 20, "{a} {b}");
    }
}
