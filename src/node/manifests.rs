//! Pods from a directory of Pod YAML, like the kubelet's static pods, and the
//! Services in front of them (see `mesh_services`) and NetworkPolicies over them (see
//! `network_policy`).
//!
//! Every `*.yaml`, `*.yml` or `*.json` file may hold several documents. A pod's UID is
//! its `metadata.uid` when given, else derived from the owner and the document's
//! content, so that an unchanged file keeps its pods across restarts and a changed
//! document becomes a new pod (the old one is stopped, as the kubelet does).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A document that could not become a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number within the file.
    pub document: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (document {}): {}",
            self.file.display(),
            self.document,
            self.message
        )
    }
}

/// The result of parsing one file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedFile {
    pub pods: Vec<Pod>,
    pub services: Vec<Manifest<Service>>,
    pub policies: Vec<Manifest<NetworkPolicy>>,
    pub errors: Vec<ManifestError>,
}

/// An object and where it was written, for errors found later.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest<T> {
    pub file: PathBuf,
    pub document: usize,
    pub object: T,
}

impl<T> Manifest<T> {
    pub fn error(&self, message: String) -> ManifestError {
        ManifestError {
            file: self.file.clone(),
            document: self.document,
            message,
        }
    }
}

/// What a document is.
enum Object {
    Pod(Box<Pod>),
    Service(Box<Service>),
    NetworkPolicy(Box<NetworkPolicy>),
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Formats 16 bytes of a digest like a UUID, the shape Kubernetes UIDs have.
fn uuid_from(digest: &[u8]) -> String {
    let h = hex::encode(&digest[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parses one file's text into pods. `owner` seeds derived UIDs so that two owners
/// with the same manifests never share a pod.
pub fn parse(file: &Path, text: &str, owner: &str) -> ParsedFile {
    let mut out = ParsedFile::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let number = index + 1;
        let error = |message: String| ManifestError {
            file: file.to_path_buf(),
            document: number,
            message,
        };
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                out.errors.push(error(format!("not valid YAML: {e}")));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        };
        let (file, document) = (file.to_path_buf(), number);
        match object_from_value(value, owner) {
            Ok(Object::Pod(pod)) => out.pods.push(*pod),
            Ok(Object::Service(service)) => out.services.push(Manifest {
                file,
                document,
                object: *service,
            }),
            Ok(Object::NetworkPolicy(policy)) => out.policies.push(Manifest {
                file,
                document,
                object: *policy,
            }),
            Err(message) => out.errors.push(error(message)),
        }
    }
    out
}

fn object_from_value(value: serde_yaml::Value, owner: &str) -> Result<Object, String> {
    let json =
        serde_json::to_value(&value).map_err(|e| format!("not a JSON-compatible document: {e}"))?;
    let api_version = json.get("apiVersion").and_then(|v| v.as_str());
    let kind = json.get("kind").and_then(|v| v.as_str());
    match (api_version, kind) {
        (Some("v1"), Some("Pod")) => {
            pod_from_json(json, owner).map(|pod| Object::Pod(Box::new(pod)))
        }
        (Some("v1"), Some("Service")) => {
            named_from_json(json, "Service", |s: &mut Service| &mut s.metadata)
                .map(|s| Object::Service(Box::new(s)))
        }
        (Some("networking.k8s.io/v1"), Some("NetworkPolicy")) => {
            named_from_json(json, "NetworkPolicy", |p: &mut NetworkPolicy| &mut p.metadata)
                .map(|p| Object::NetworkPolicy(Box::new(p)))
        }
        (None, _) | (_, None) => {
            Err("not a Kubernetes object: apiVersion and kind are required".into())
        }
        (Some(a), Some(k)) => Err(format!(
            "{a}/{k} is not supported here: only v1/Pod, v1/Service and networking.k8s.io/v1/NetworkPolicy manifests can run on BeeMesh"
        )),
    }
}

/// An object that must have a name, in the default namespace unless it names one.
fn named_from_json<T: serde::de::DeserializeOwned>(
    json: serde_json::Value,
    kind: &str,
    metadata: impl Fn(&mut T) -> &mut ObjectMeta,
) -> Result<T, String> {
    let mut object: T = serde_json::from_value(json).map_err(|e| format!("invalid {kind}: {e}"))?;
    let meta = metadata(&mut object);
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        return Err("metadata.name is required".into());
    }
    default_namespace(meta);
    Ok(object)
}

fn default_namespace(metadata: &mut ObjectMeta) {
    if metadata.namespace.as_deref().unwrap_or_default().is_empty() {
        metadata.namespace = Some("default".into());
    }
}

fn pod_from_json(json: serde_json::Value, owner: &str) -> Result<Pod, String> {
    let mut pod: Pod =
        serde_json::from_value(json.clone()).map_err(|e| format!("invalid Pod: {e}"))?;
    let name = pod.metadata.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err("metadata.name is required".into());
    }
    if pod.spec.is_none() {
        return Err(format!("pod {name}: spec is required"));
    }
    default_namespace(&mut pod.metadata);
    if pod.metadata.uid.as_deref().unwrap_or_default().is_empty() {
        let mut hasher = Sha256::new();
        hasher.update(owner.as_bytes());
        hasher.update(b"\n");
        // serde_json's map is ordered, so equal documents hash equally.
        hasher.update(json.to_string().as_bytes());
        pod.metadata.uid = Some(uuid_from(&hasher.finalize()));
    }
    Ok(pod)
}

#[derive(Debug, Clone, PartialEq)]
struct CachedFile {
    modified: Option<SystemTime>,
    len: u64,
    parsed: ParsedFile,
}

/// Scans a manifest directory, re-parsing only files whose size or mtime changed.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    owner: String,
    cache: HashMap<PathBuf, CachedFile>,
}

/// Everything the directory holds now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scan {
    /// By UID.
    pub pods: BTreeMap<String, Pod>,
    /// At most one of each per namespace and name.
    pub services: Vec<Manifest<Service>>,
    pub policies: Vec<Manifest<NetworkPolicy>>,
    pub errors: Vec<ManifestError>,
}

impl ManifestDir {
    pub fn new(dir: PathBuf, owner: String) -> Self {
        ManifestDir {
            dir,
            owner,
            cache: HashMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub async fn scan(&mut self) -> std::io::Result<Scan> {
        let mut entries = tokio::fs::read_dir(&self.dir).await?;
        let mut seen = Vec::new();
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = entry.metadata().await else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            seen.push(path.clone());
            let modified = meta.modified().ok();
            if self
                .cache
                .get(&path)
                .is_some_and(|c| c.modified == modified && c.len == meta.len())
            {
                continue;
            }
            let parsed = match tokio::fs::read(&path).await {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) => parse(&path, &text, &self.owner),
                    Err(_) => ParsedFile {
                        errors: vec![ManifestError {
                            file: path.clone(),
                            document: 1,
                            message: "not UTF-8 text".into(),
                        }],
                        ..ParsedFile::default()
                    },
                },
                // Removed between listing and reading: the next scan settles it.
                Err(_) => continue,
            };
            self.cache.insert(
                path,
                CachedFile {
                    modified,
                    len: meta.len(),
                    parsed,
                },
            );
        }
        self.cache.retain(|path, _| seen.contains(path));

        let mut scan = Scan::default();
        let mut by_name: HashMap<(String, String), PathBuf> = HashMap::new();
        let mut files: Vec<_> = self.cache.iter().collect();
        files.sort_by(|a, b| a.0.cmp(b.0));
        for (path, cached) in files {
            scan.errors.extend(cached.parsed.errors.iter().cloned());
            for (i, mp) in cached.parsed.pods.iter().enumerate() {
                let key = (
                    mp.metadata.namespace.clone().unwrap_or_default(),
                    mp.metadata.name.clone().unwrap_or_default(),
                );
                if let Some(first) = by_name.get(&key) {
                    scan.errors.push(ManifestError {
                        file: path.clone(),
                        document: i + 1,
                        message: format!(
                            "pod {}/{} is already defined in {}",
                            key.0,
                            key.1,
                            first.display()
                        ),
                    });
                    continue;
                }
                by_name.insert(key, path.clone());
                let uid = mp.metadata.uid.clone().unwrap_or_default();
                scan.pods.insert(uid, mp.clone());
            }
            unique(
                &cached.parsed.services,
                "service",
                &mut scan.services,
                &mut scan.errors,
            );
            unique(
                &cached.parsed.policies,
                "networkpolicy",
                &mut scan.policies,
                &mut scan.errors,
            );
        }
        Ok(scan)
    }
}

/// Adds the objects not already in `into` by namespace and name; the others are errors.
fn unique<T: kube::Resource + Clone>(
    objects: &[Manifest<T>],
    kind: &str,
    into: &mut Vec<Manifest<T>>,
    errors: &mut Vec<ManifestError>,
) {
    for manifest in objects {
        let key = |m: &Manifest<T>| {
            (
                m.object.meta().namespace.clone(),
                m.object.meta().name.clone(),
            )
        };
        if let Some(first) = into.iter().find(|known| key(known) == key(manifest)) {
            let (namespace, name) = key(manifest);
            errors.push(manifest.error(format!(
                "{kind} {}/{} is already defined in {}",
                namespace.unwrap_or_default(),
                name.unwrap_or_default(),
                first.file.display()
            )));
            continue;
        }
        into.push(manifest.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: a}
spec:
  containers: [{name: c, image: localhost/busybox:1.35}]
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: team}
spec:
  containers: [{name: c, image: localhost/busybox:1.35}]
"#;

    #[test]
    fn several_documents_with_defaults_and_stable_uids() {
        let parsed = parse(Path::new("x.yaml"), TWO_PODS, "owner1");
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.pods.len(), 2);
        let a = &parsed.pods[0];
        assert_eq!(a.metadata.namespace.as_deref(), Some("default"));
        let uid = a.metadata.uid.clone().expect("uid");
        assert_eq!(uid.len(), 36);
        let again = parse(Path::new("y.yaml"), TWO_PODS, "owner1");
        assert_eq!(again.pods[0].metadata.uid.as_deref(), Some(uid.as_str()));
        let other_owner = parse(Path::new("x.yaml"), TWO_PODS, "owner2");
        assert_ne!(
            other_owner.pods[0].metadata.uid.as_deref(),
            Some(uid.as_str())
        );
        let changed = parse(
            Path::new("x.yaml"),
            &TWO_PODS.replace("1.35", "1.36"),
            "owner1",
        );
        assert_ne!(changed.pods[0].metadata.uid.as_deref(), Some(uid.as_str()));
    }

    #[test]
    fn bad_documents_become_clear_errors() {
        let cases = [
            ("key: [unclosed", "not valid YAML"),
            ("just a string", "apiVersion and kind are required"),
            (
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}",
                "apps/v1/Deployment is not supported",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {}\nspec: {containers: []}",
                "metadata.name is required",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}",
                "spec is required",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: 7}",
                "invalid Pod",
            ),
        ];
        for (text, expected) in cases {
            let parsed = parse(Path::new("bad.yaml"), text, "o");
            assert!(parsed.pods.is_empty(), "{text}");
            assert_eq!(parsed.errors.len(), 1, "{text}");
            assert!(
                parsed.errors[0].message.contains(expected),
                "{text}: {}",
                parsed.errors[0].message
            );
        }
        let mixed = format!("{TWO_PODS}\n---\nkind: Nope\n");
        let parsed = parse(Path::new("m.yaml"), &mixed, "o");
        assert_eq!(parsed.pods.len(), 2);
        assert_eq!(parsed.errors[0].document, 3);
    }

    #[tokio::test]
    async fn directory_scan_sees_adds_changes_removes_and_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut source = ManifestDir::new(dir.path().to_path_buf(), "o".into());
        assert!(source.scan().await.expect("scan").pods.is_empty());
        std::fs::write(dir.path().join("a.yaml"), TWO_PODS).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let scan = source.scan().await.expect("scan");
        assert_eq!(scan.pods.len(), 2);
        std::fs::write(dir.path().join("dup.yml"), TWO_PODS).expect("write");
        let scan = source.scan().await.expect("scan");
        assert_eq!(scan.pods.len(), 2);
        assert_eq!(scan.errors.len(), 2, "{:?}", scan.errors);
        assert!(scan.errors[0].message.contains("already defined"));
        std::fs::remove_file(dir.path().join("a.yaml")).expect("rm");
        std::fs::remove_file(dir.path().join("dup.yml")).expect("rm");
        let scan = source.scan().await.expect("scan");
        assert!(scan.pods.is_empty() && scan.errors.is_empty());
    }

    #[tokio::test]
    async fn services_beside_pods_are_read_with_where_they_were_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut source = ManifestDir::new(dir.path().to_path_buf(), "o".into());
        let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80}]}";
        let text = format!(
            "{TWO_PODS}\n---\n{service}\n---\napiVersion: v1\nkind: Service\nmetadata: {{}}\n"
        );
        std::fs::write(dir.path().join("a.yaml"), &text).expect("write");
        std::fs::write(dir.path().join("b.yaml"), service).expect("write");
        let scan = source.scan().await.expect("scan");
        assert_eq!(scan.pods.len(), 2);
        assert_eq!(scan.services.len(), 1);
        let web = &scan.services[0];
        assert_eq!(
            (web.file.file_name(), web.document),
            (Some("a.yaml".as_ref()), 3)
        );
        assert_eq!(web.object.metadata.namespace.as_deref(), Some("default"));
        let messages: Vec<_> = scan
            .errors
            .iter()
            .map(|e| (e.document, e.message.as_str()))
            .collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert_eq!(messages[0], (4, "metadata.name is required"));
        assert!(
            messages[1]
                .1
                .starts_with("service default/web is already defined in"),
            "{messages:?}"
        );
    }
}
