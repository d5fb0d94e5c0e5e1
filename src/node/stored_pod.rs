//! A pod the node keeps for as long as a source wants it, held as its JSON. As
//! k8s-openapi structs, every absent field of a pod takes room too: a typical
//! Deployment pod is 8.7 KB of structs and 905 bytes of JSON, and a node tracking a
//! million pods holds them all. The whole pod is decoded where it is needed whole (an
//! assignment, the kubelet API's pod list); what the owner reads often is kept beside it.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

/// A pod as JSON, shared: cloning one clones a pointer, and two are equal when their
/// pods are (serde_json writes the same struct the same way every time).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredPod(Arc<[u8]>);

impl StoredPod {
    pub fn new(pod: &Pod) -> StoredPod {
        match serde_json::to_vec(pod) {
            Ok(json) => StoredPod(json.into()),
            // Cannot happen: every map in a pod has string keys.
            Err(e) => {
                tracing::error!(error = %e, "a pod does not serialize; kept empty");
                StoredPod(Arc::from(&b"{}"[..]))
            }
        }
    }

    /// The pod, decoded.
    pub fn pod(&self) -> Pod {
        match serde_json::from_slice(&self.0) {
            Ok(pod) => pod,
            // Cannot happen: the bytes are a pod serde_json wrote.
            Err(e) => {
                tracing::error!(error = %e, "a stored pod does not decode");
                Pod::default()
            }
        }
    }
}

impl fmt::Debug for StoredPod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pod itself, as a failed assertion between two wants to show it.
        fmt::Debug::fmt(&self.pod(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    fn pod(image: &str) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("web".into());
        pod.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        pod.spec = Some(PodSpec {
            containers: vec![Container {
                name: "web".into(),
                image: Some(image.into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        pod
    }

    #[test]
    fn a_stored_pod_decodes_to_the_same_pod_and_compares_as_its_pod() {
        let stored = StoredPod::new(&pod("nginx:1"));
        assert_eq!(stored.pod(), pod("nginx:1"));
        assert_eq!(stored, StoredPod::new(&pod("nginx:1")));
        assert_ne!(stored, StoredPod::new(&pod("nginx:2")));
    }
}
