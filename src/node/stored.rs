//! What the node keeps of each pod for as long as a source wants it, held as JSON. As
//! k8s-openapi structs every absent field takes room too: a typical Deployment pod is
//! 8.7 KB of structs and 905 bytes of JSON, its running status about 2.4 KB and 700
//! bytes, and a node tracking a million pods holds them all. A value is decoded where
//! it is needed whole (an assignment, the kubelet API's pod list, a status change);
//! what the owner reads often is kept beside it.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A pod as the node keeps it.
pub type StoredPod = Stored<Pod>;
/// A pod's status as the owner keeps it.
pub type StoredStatus = Stored<PodStatus>;

/// A value as JSON, shared: cloning one clones a pointer, and two are equal when their
/// values are (serde_json writes the same struct the same way every time).
pub struct Stored<T> {
    json: Arc<[u8]>,
    kind: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Default> Stored<T> {
    pub fn new(value: &T) -> Stored<T> {
        let json = match serde_json::to_vec(value) {
            Ok(json) => json.into(),
            // Cannot happen: every map in a pod or a status has string keys.
            Err(e) => {
                tracing::error!(error = %e, "a value does not serialize; kept empty");
                Arc::from(&b"{}"[..])
            }
        };
        Stored {
            json,
            kind: PhantomData,
        }
    }

    /// The value, decoded.
    pub fn get(&self) -> T {
        match serde_json::from_slice(&self.json) {
            Ok(value) => value,
            // Cannot happen: the bytes are a value serde_json wrote.
            Err(e) => {
                tracing::error!(error = %e, "a stored value does not decode");
                T::default()
            }
        }
    }
}

impl Stored<Pod> {
    /// Whether the pod's labels hold every pair of `selector`, read without decoding
    /// the rest of the pod: a Service's connections look at every pod of its namespace.
    pub fn labels_match(&self, selector: &BTreeMap<String, String>) -> bool {
        #[derive(Deserialize)]
        struct Labels {
            #[serde(default)]
            metadata: Metadata,
        }
        #[derive(Deserialize, Default)]
        struct Metadata {
            #[serde(default)]
            labels: Option<BTreeMap<String, String>>,
        }
        let labels = match serde_json::from_slice::<Labels>(&self.json) {
            Ok(pod) => pod.metadata.labels.unwrap_or_default(),
            // Cannot happen: the bytes are a pod serde_json wrote.
            Err(e) => {
                tracing::error!(error = %e, "a stored pod's labels do not decode");
                return false;
            }
        };
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

impl<T> Clone for Stored<T> {
    fn clone(&self) -> Self {
        Stored {
            json: self.json.clone(),
            kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Stored<T> {
    fn eq(&self, other: &Self) -> bool {
        self.json == other.json
    }
}

impl<T> Eq for Stored<T> {}

impl<T: Serialize + DeserializeOwned + Default + fmt::Debug> fmt::Debug for Stored<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The value itself, as a failed assertion between two wants to show it.
        fmt::Debug::fmt(&self.get(), f)
    }
}

impl<T: Serialize + DeserializeOwned + Default> Default for Stored<T> {
    fn default() -> Self {
        Stored::new(&T::default())
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
    fn a_stored_value_decodes_to_the_same_value_and_compares_as_its_value() {
        let stored = StoredPod::new(&pod("nginx:1"));
        assert_eq!(stored.get(), pod("nginx:1"));
        assert_eq!(stored, StoredPod::new(&pod("nginx:1")));
        assert_ne!(stored, StoredPod::new(&pod("nginx:2")));
        let status = PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        };
        assert_eq!(StoredStatus::new(&status).get(), status);
        assert_eq!(StoredStatus::default().get(), PodStatus::default());
    }

    #[test]
    fn a_stored_pod_matches_a_selector_as_its_decoded_labels_do() {
        let mut labelled = pod("nginx:1");
        labelled.metadata.labels = Some(
            [("app", "web"), ("tier", "front")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
        );
        let stored = StoredPod::new(&labelled);
        let selector = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(stored.labels_match(&selector(&[("app", "web")])));
        assert!(stored.labels_match(&selector(&[("app", "web"), ("tier", "front")])));
        assert!(!stored.labels_match(&selector(&[("app", "db")])));
        assert!(!stored.labels_match(&selector(&[("app", "web"), ("zone", "a")])));
        let unlabelled = StoredPod::new(&Pod::default());
        assert!(!unlabelled.labels_match(&selector(&[("app", "web")])));
        // As a selector with no pairs holds for every pod (the caller decides what an
        // empty selector means).
        assert!(unlabelled.labels_match(&selector(&[])));
    }

    #[test]
    fn statuses_apart_by_less_than_a_second_are_equal_as_stored_as_the_api_keeps_them() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use k8s_openapi::jiff::Timestamp;
        let at = |seconds: i64, nanos: i32| PodStatus {
            start_time: Timestamp::new(seconds, nanos).ok().map(Time),
            ..Default::default()
        };
        let stored = StoredStatus::new(&at(1_700_000_000, 0));
        assert_eq!(stored, StoredStatus::new(&at(1_700_000_000, 300_000_000)));
        assert_ne!(stored, StoredStatus::new(&at(1_700_000_001, 0)));
    }
}
