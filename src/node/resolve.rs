//! What a pod takes from the Kubernetes API, resolved by its owner before placement.
//!
//! Env values from configMaps and secrets (`valueFrom`, `envFrom`) are written into the
//! pod as literal values, and the files of configMap, secret, downwardAPI and projected
//! volumes (including the service account token) are computed, so that the agent needs
//! no API access and only the assigned agent ever sees the data. Pure: the objects come
//! in as [`Fetched`], fetched by the caller from [`references`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, EnvVar, KeyToPath, Pod, PodSpec, Secret,
};
use k8s_openapi::ByteString;

use super::stored::StoredPod;
use crate::runtime::{registry_auth, translate};
use crate::wire::{RegistryCredential, VolumeFile};

/// The kubelet's default for `defaultMode` of configMap, secret, downwardAPI and
/// projected volumes (0644).
const DEFAULT_FILE_MODE: i32 = 0o644;
/// The API server's default for a projected token's `expirationSeconds`.
const DEFAULT_TOKEN_EXPIRATION_SECS: i64 = 3600;
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// A service account token a pod's projected volume asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenSpec {
    pub service_account: String,
    /// None: the API server's own audience.
    pub audience: Option<String>,
    pub expiration_secs: i64,
}

/// The API objects a pod refers to, by name in the pod's namespace.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct References {
    pub config_maps: BTreeSet<String>,
    /// Including the image pull secrets.
    pub secrets: BTreeSet<String>,
    pub tokens: BTreeSet<TokenSpec>,
}

impl References {
    pub fn is_empty(&self) -> bool {
        self.config_maps.is_empty() && self.secrets.is_empty() && self.tokens.is_empty()
    }
}

/// The referred objects as fetched; a name that is absent was not found.
#[derive(Debug, Default, Clone)]
pub struct Fetched {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
    pub tokens: BTreeMap<TokenSpec, String>,
    /// The Service environment variables every container gets (see
    /// `node::service_env`); the container's own variables of the same names win.
    pub service_env: Arc<BTreeMap<String, String>>,
}

/// A pod ready for placement. Shared (the owner keeps what it assigned).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The pod with every env var from a configMap or secret turned into a literal,
    /// if that changed it; None, as for most pods: the pod as its source has it.
    pub rewritten: Option<StoredPod>,
    /// Files of the pod's API-backed volumes, by volume name.
    pub volumes: Arc<BTreeMap<String, Vec<VolumeFile>>>,
    /// The logins of its image pull secrets.
    pub pull_credentials: Arc<Vec<RegistryCredential>>,
    /// Image pull secrets that are missing or hold no docker config, as the kubelet's
    /// `FailedToRetrieveImagePullSecret` event lists them. They do not stop the pod: its
    /// images are pulled without them, as the kubelet pulls them.
    pub unusable_pull_secrets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Something the pod needs does not exist (yet): the pod waits, as the kubelet's
    /// CreateContainerConfigError, and is resolved again when it appears.
    #[error("{0}")]
    Missing(String),
    /// The API server refused the node something the pod needs (403: its service account
    /// may not read there, e.g. a namespace it does not serve): the pod waits as for
    /// Missing, and is resolved again, less often, in case the permission is granted.
    #[error("{0}")]
    Denied(String),
    /// The pod can never be resolved.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: String, message: impl Into<String>) -> ResolveError {
    ResolveError::Invalid {
        field,
        message: message.into(),
    }
}

fn service_account(spec: &PodSpec) -> String {
    [&spec.service_account_name, &spec.service_account]
        .into_iter()
        .flatten()
        .find(|name| !name.is_empty())
        .cloned()
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned())
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

/// Every configMap, secret and token the pod refers to.
pub fn references(pod: &Pod) -> References {
    let mut refs = References::default();
    let Some(spec) = &pod.spec else {
        return refs;
    };
    refs.secrets
        .extend(pull_secret_names(spec).map(str::to_string));
    for container in all_containers(spec) {
        for from in container.env_from.iter().flatten() {
            if let Some(cm) = &from.config_map_ref {
                refs.config_maps.insert(cm.name.clone());
            }
            if let Some(secret) = &from.secret_ref {
                refs.secrets.insert(secret.name.clone());
            }
        }
        for var in container.env.iter().flatten() {
            let Some(from) = &var.value_from else {
                continue;
            };
            if let Some(key) = &from.config_map_key_ref {
                refs.config_maps.insert(key.name.clone());
            }
            if let Some(key) = &from.secret_key_ref {
                refs.secrets.insert(key.name.clone());
            }
        }
    }
    for volume in spec.volumes.iter().flatten() {
        if let Some(cm) = &volume.config_map {
            refs.config_maps.insert(cm.name.clone());
        }
        if let Some(secret) = &volume.secret {
            refs.secrets
                .insert(secret.secret_name.clone().unwrap_or_default());
        }
        for source in volume
            .projected
            .iter()
            .flat_map(|p| p.sources.iter().flatten())
        {
            if let Some(cm) = &source.config_map {
                refs.config_maps.insert(cm.name.clone());
            }
            if let Some(secret) = &source.secret {
                refs.secrets.insert(secret.name.clone());
            }
            if let Some(token) = &source.service_account_token {
                refs.tokens.insert(token_spec(spec, token));
            }
        }
    }
    refs
}

/// The names in `imagePullSecrets`; an empty one is skipped, as by the kubelet.
fn pull_secret_names(spec: &PodSpec) -> impl Iterator<Item = &str> {
    spec.image_pull_secrets
        .iter()
        .flatten()
        .map(|reference| reference.name.as_str())
        .filter(|name| !name.is_empty())
}

/// The logins of the pod's image pull secrets, in their order, and the secrets that
/// could not be used (`name` when missing, `name: why` when unreadable).
fn pull_credentials(spec: &PodSpec, fetched: &Fetched) -> (Vec<RegistryCredential>, Vec<String>) {
    let mut credentials = Vec::new();
    let mut unusable = Vec::new();
    for name in pull_secret_names(spec) {
        match fetched.secrets.get(name).map(registry_auth::credentials) {
            Some(Ok(found)) => credentials.extend(found),
            Some(Err(e)) => unusable.push(format!("{name}: {e}")),
            None => unusable.push(name.to_string()),
        }
    }
    (credentials, unusable)
}

fn token_spec(
    spec: &PodSpec,
    token: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
) -> TokenSpec {
    TokenSpec {
        service_account: service_account(spec),
        audience: token.audience.clone().filter(|a| !a.is_empty()),
        expiration_secs: token
            .expiration_seconds
            .unwrap_or(DEFAULT_TOKEN_EXPIRATION_SECS),
    }
}

/// The pod with its env and volumes resolved against `fetched`.
pub fn resolve(pod: &Pod, fetched: &Fetched) -> Result<Resolved, ResolveError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let lookup = Lookup { namespace, fetched };
    let mut resolved = Pod::clone(pod);
    let Some(spec) = resolved.spec.as_mut() else {
        return Ok(Resolved {
            rewritten: None,
            volumes: Arc::default(),
            pull_credentials: Arc::default(),
            unusable_pull_secrets: Vec::new(),
        });
    };
    for container in spec
        .init_containers
        .iter_mut()
        .flatten()
        .chain(&mut spec.containers)
    {
        resolve_env(container, &lookup)?;
        add_service_env(container, &fetched.service_env);
    }
    let spec_view = pod.spec.clone().unwrap_or_default();
    let (pull_credentials, unusable_pull_secrets) = pull_credentials(&spec_view, fetched);
    let mut volumes = BTreeMap::new();
    for (index, volume) in spec_view.volumes.iter().flatten().enumerate() {
        let path = format!("spec.volumes[{index}]");
        let keyed = Keyed::of_volume(volume);
        let files = if let Some(keyed) = keyed {
            let mode = keyed.default_mode.unwrap_or(DEFAULT_FILE_MODE);
            Some(lookup.files(&path, &keyed, mode)?)
        } else if let Some(downward) = &volume.downward_api {
            let mode = downward.default_mode.unwrap_or(DEFAULT_FILE_MODE);
            Some(downward_files(
                &format!("{path}.downwardAPI"),
                pod,
                &spec_view,
                downward.items.as_deref().unwrap_or_default(),
                mode,
            )?)
        } else if let Some(projected) = &volume.projected {
            let mode = projected.default_mode.unwrap_or(DEFAULT_FILE_MODE);
            let mut files = Vec::new();
            for (i, source) in projected.sources.iter().flatten().enumerate() {
                let path = format!("{path}.projected.sources[{i}]");
                if let Some(keyed) = Keyed::of_projection(source) {
                    files.extend(lookup.files(&path, &keyed, mode)?);
                } else if let Some(downward) = &source.downward_api {
                    files.extend(downward_files(
                        &format!("{path}.downwardAPI"),
                        pod,
                        &spec_view,
                        downward.items.as_deref().unwrap_or_default(),
                        mode,
                    )?);
                } else if let Some(token) = &source.service_account_token {
                    let spec = token_spec(&spec_view, token);
                    let value = fetched.tokens.get(&spec).ok_or_else(|| {
                        ResolveError::Missing(format!(
                            "no token yet for service account \"{}\"",
                            spec.service_account
                        ))
                    })?;
                    files.push(file(
                        &format!("{path}.serviceAccountToken.path"),
                        &token.path,
                        value.as_bytes().to_vec(),
                        mode,
                    )?);
                } else {
                    return Err(invalid(
                        path,
                        "only configMap, secret, downwardAPI and serviceAccountToken \
                         projections are supported",
                    ));
                }
            }
            Some(files)
        } else {
            None
        };
        if let Some(files) = files {
            volumes.insert(volume.name.clone(), files);
        }
    }
    Ok(Resolved {
        rewritten: (resolved != *pod).then(|| StoredPod::new(&resolved)),
        volumes: Arc::new(volumes),
        pull_credentials: Arc::new(pull_credentials),
        unusable_pull_secrets,
    })
}

/// The Service variables go first: the container's own of the same names replace
/// them, and its `$(VAR)` references can name them, as with the kubelet.
fn add_service_env(container: &mut Container, service_env: &BTreeMap<String, String>) {
    if service_env.is_empty() {
        return;
    }
    let declared: BTreeSet<&str> = container
        .env
        .iter()
        .flatten()
        .map(|var| var.name.as_str())
        .collect();
    let mut env: Vec<EnvVar> = service_env
        .iter()
        .filter(|(name, _)| !declared.contains(name.as_str()))
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: Some(value.clone()),
            value_from: None,
        })
        .collect();
    env.extend(container.env.take().into_iter().flatten());
    container.env = Some(env);
}

struct Lookup<'a> {
    namespace: &'a str,
    fetched: &'a Fetched,
}

impl Lookup<'_> {
    /// The keys and values of a configMap or secret; None if it is missing and optional.
    fn data(
        &self,
        kind: Kind,
        name: &str,
        optional: Option<bool>,
    ) -> Result<Option<KeyedData>, ResolveError> {
        let found = match kind {
            Kind::ConfigMap => self.fetched.config_maps.get(name).map(KeyedData::from),
            Kind::Secret => self.fetched.secrets.get(name).map(KeyedData::from),
        };
        match found {
            Some(data) => Ok(Some(data)),
            None if optional == Some(true) => Ok(None),
            None => Err(ResolveError::Missing(format!(
                "{} \"{name}\" not found",
                kind.lowercase()
            ))),
        }
    }

    /// The files a configMap or secret volume (or projection) shows: the listed items,
    /// or every key when none are listed.
    fn files(
        &self,
        path: &str,
        keyed: &Keyed,
        default_mode: i32,
    ) -> Result<Vec<VolumeFile>, ResolveError> {
        let field = format!("{path}.{}", keyed.kind.field());
        let Some(KeyedData(data)) = self.data(keyed.kind, keyed.name, keyed.optional)? else {
            return Ok(Vec::new());
        };
        let Some(items) = keyed.items.filter(|items| !items.is_empty()) else {
            return data
                .into_iter()
                .map(|(key, value)| file(&field, &key, value, default_mode))
                .collect();
        };
        let mut files = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match data.get(&item.key) {
                Some(value) => files.push(file(
                    &format!("{field}.items[{i}].path"),
                    &item.path,
                    value.clone(),
                    item.mode.unwrap_or(default_mode),
                )?),
                None if keyed.optional == Some(true) => {}
                None => return Err(ResolveError::Missing(keyed.kind.missing_key(&item.key))),
            }
        }
        Ok(files)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ConfigMap,
    Secret,
}

impl Kind {
    /// As the kubelet names it in "not found" messages.
    fn lowercase(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configmap",
            Kind::Secret => "secret",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Kind::ConfigMap => "configMap",
            Kind::Secret => "secret",
        }
    }

    fn api_kind(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
        }
    }

    /// The kubelet's message for an item whose key the object lacks.
    fn missing_key(self, key: &str) -> String {
        match self {
            Kind::ConfigMap => format!("configmap references non-existent config key: {key}"),
            Kind::Secret => format!("references non-existent secret key: {key}"),
        }
    }
}

/// A configMap or secret shown as files by a volume or a projection.
struct Keyed<'a> {
    kind: Kind,
    name: &'a str,
    items: Option<&'a [KeyToPath]>,
    optional: Option<bool>,
    /// Volumes have their own; projections use the projected volume's.
    default_mode: Option<i32>,
}

impl<'a> Keyed<'a> {
    fn of_volume(volume: &'a k8s_openapi::api::core::v1::Volume) -> Option<Keyed<'a>> {
        let config_map = volume.config_map.as_ref().map(|cm| Keyed {
            kind: Kind::ConfigMap,
            name: &cm.name,
            items: cm.items.as_deref(),
            optional: cm.optional,
            default_mode: cm.default_mode,
        });
        config_map.or_else(|| {
            volume.secret.as_ref().map(|secret| Keyed {
                kind: Kind::Secret,
                name: secret.secret_name.as_deref().unwrap_or_default(),
                items: secret.items.as_deref(),
                optional: secret.optional,
                default_mode: secret.default_mode,
            })
        })
    }

    fn of_projection(
        source: &'a k8s_openapi::api::core::v1::VolumeProjection,
    ) -> Option<Keyed<'a>> {
        let config_map = source.config_map.as_ref().map(|cm| Keyed {
            kind: Kind::ConfigMap,
            name: &cm.name,
            items: cm.items.as_deref(),
            optional: cm.optional,
            default_mode: None,
        });
        config_map.or_else(|| {
            source.secret.as_ref().map(|secret| Keyed {
                kind: Kind::Secret,
                name: &secret.name,
                items: secret.items.as_deref(),
                optional: secret.optional,
                default_mode: None,
            })
        })
    }
}

/// The keys and values of a configMap (data and binaryData) or a secret.
struct KeyedData(BTreeMap<String, Vec<u8>>);

impl From<&ConfigMap> for KeyedData {
    fn from(cm: &ConfigMap) -> Self {
        let text = cm
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes()));
        let binary = cm
            .binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()));
        KeyedData(text.chain(binary).collect())
    }
}

impl From<&Secret> for KeyedData {
    fn from(secret: &Secret) -> Self {
        KeyedData(
            secret
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.0.clone()))
                .collect(),
        )
    }
}

/// Escapes a literal for the env list, whose values the agent `$(VAR)`-expands (values
/// from configMaps and secrets are not expanded by the kubelet).
fn literal(value: &[u8]) -> String {
    String::from_utf8_lossy(value).replace('$', "$$")
}

/// The container's env as the kubelet builds it from envFrom then env, with every
/// configMap and secret reference replaced by its value.
fn resolve_env(container: &mut Container, lookup: &Lookup) -> Result<(), ResolveError> {
    let mut env: Vec<EnvVar> = Vec::new();
    let set = |env: &mut Vec<EnvVar>, var: EnvVar| match env.iter_mut().find(|v| v.name == var.name)
    {
        Some(existing) => *existing = var,
        None => env.push(var),
    };
    for from in container.env_from.take().into_iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(cm) = &from.config_map_ref {
            lookup.data(Kind::ConfigMap, &cm.name, cm.optional)?
        } else if let Some(secret) = &from.secret_ref {
            lookup.data(Kind::Secret, &secret.name, secret.optional)?
        } else {
            None
        };
        for (key, value) in data.map(|d| d.0).unwrap_or_default() {
            let name = format!("{prefix}{key}");
            // The kubelet skips (and reports) keys that are not valid variable names.
            if is_env_var_name(&name) {
                set(
                    &mut env,
                    EnvVar {
                        name,
                        value: Some(literal(&value)),
                        value_from: None,
                    },
                );
            }
        }
    }
    for mut var in container.env.take().into_iter().flatten() {
        let source = var.value_from.as_ref();
        let reference = match (
            source.and_then(|s| s.config_map_key_ref.as_ref()),
            source.and_then(|s| s.secret_key_ref.as_ref()),
        ) {
            (Some(r), _) => Some((&r.name, &r.key, r.optional, Kind::ConfigMap)),
            (None, Some(r)) => Some((&r.name, &r.key, r.optional, Kind::Secret)),
            // A literal, or a fieldRef/resourceFieldRef for the agent to fill in.
            (None, None) => None,
        };
        if let Some((name, key, optional, kind)) = reference {
            let data = lookup.data(kind, name, optional)?;
            match data.as_ref().and_then(|d| d.0.get(key)) {
                Some(value) => var.value = Some(literal(value)),
                None if optional == Some(true) => continue,
                None => {
                    return Err(ResolveError::Missing(format!(
                        "couldn't find key {key} in {} {}/{name}",
                        kind.api_kind(),
                        lookup.namespace
                    )))
                }
            }
            var.value_from = None;
        }
        set(&mut env, var);
    }
    container.env = (!env.is_empty()).then_some(env);
    Ok(())
}

/// Environment variable names as the API server accepts them since Kubernetes 1.30:
/// printable ASCII without '='.
fn is_env_var_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'=')
}

/// A file at a relative path without `..`, as the API server validates item paths.
fn file(field: &str, path: &str, data: Vec<u8>, mode: i32) -> Result<VolumeFile, ResolveError> {
    if !is_relative_path(path) {
        return Err(invalid(
            field.to_owned(),
            format!("\"{path}\" must be a relative path without '..'"),
        ));
    }
    let mode = u32::try_from(mode)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            invalid(
                field.to_owned(),
                format!("mode {mode} must be between 0 and 0777"),
            )
        })?;
    Ok(VolumeFile {
        path: path.to_owned(),
        data: ByteString(data),
        mode,
    })
}

pub fn is_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|part| part != ".." && !part.is_empty())
}

/// Files of a downwardAPI volume (or projection).
fn downward_files(
    field: &str,
    pod: &Pod,
    spec: &PodSpec,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
) -> Result<Vec<VolumeFile>, ResolveError> {
    let mut files = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = format!("{field}.items[{i}]");
        let value = match (&item.field_ref, &item.resource_field_ref) {
            (Some(selector), None) => downward_field(&pod.metadata, &selector.field_path)
                .ok_or_else(|| {
                    invalid(
                        format!("{field}.fieldRef.fieldPath"),
                        format!(
                            "\"{}\" is not supported in volumes (metadata.name, namespace, \
                             uid, labels, annotations)",
                            selector.field_path
                        ),
                    )
                })?,
            (None, Some(selector)) => translate::volume_resource_field(selector, spec)
                .map_err(|message| invalid(format!("{field}.resourceFieldRef"), message))?,
            _ => {
                return Err(invalid(
                    field,
                    "must have exactly one of fieldRef and resourceFieldRef",
                ))
            }
        };
        files.push(file(
            &format!("{field}.path"),
            &item.path,
            value.into_bytes(),
            item.mode.unwrap_or(default_mode),
        )?);
    }
    Ok(files)
}

/// A downward API field as the kubelet writes it into a volume file.
fn downward_field(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    path: &str,
) -> Option<String> {
    let empty = BTreeMap::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    if let Some((base, key)) = path.strip_suffix("']").and_then(|p| p.split_once("['")) {
        let map = match base {
            "metadata.labels" => labels,
            "metadata.annotations" => annotations,
            _ => return None,
        };
        return Some(map.get(key).cloned().unwrap_or_default());
    }
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => Some(meta.namespace.clone().unwrap_or_else(|| "default".into())),
        "metadata.uid" => meta.uid.clone(),
        "metadata.labels" => Some(format_map(labels)),
        "metadata.annotations" => Some(format_map(annotations)),
        _ => None,
    }
}

/// The kubelet's `fieldpath.FormatMap`: sorted `key="value"` lines, values quoted as Go's
/// `%q` does.
fn format_map(map: &BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn go_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Arc<Pod> {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1",
                "labels": {"app": "web", "tier": "front"},
                "annotations": {"note": "say \"hi\"\n"}
            },
            "spec": spec,
        }))
        .map(Arc::new)
        .expect("pod")
    }

    fn config_map(data: serde_json::Value) -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": data})).expect("cm")
    }

    fn secret(data: serde_json::Value) -> Secret {
        serde_json::from_value(json!({"metadata": {"name": "creds"}, "data": data}))
            .expect("secret")
    }

    fn fetched() -> Fetched {
        Fetched {
            config_maps: BTreeMap::from([(
                "cfg".to_string(),
                config_map(json!({"mode": "fast", "price": "$(HOME)", "bad=key": "x"})),
            )]),
            // "s3cr3t" and "admin" in base64.
            secrets: BTreeMap::from([(
                "creds".to_string(),
                secret(json!({"password": "czNjcjN0", "user": "YWRtaW4="})),
            )]),
            tokens: BTreeMap::new(),
            service_env: Arc::default(),
        }
    }

    fn env_of(resolved: &Resolved) -> Vec<(String, Option<String>)> {
        let rewritten = resolved.rewritten.as_ref().expect("rewritten").get();
        rewritten.spec.expect("spec").containers[0]
            .env
            .iter()
            .flatten()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect()
    }

    #[test]
    fn env_from_config_maps_and_secrets_becomes_literal_values() {
        let pod = pod(json!({"containers": [{
            "name": "c", "image": "busybox",
            "envFrom": [{"configMapRef": {"name": "cfg"}}, {"secretRef": {"name": "creds"}, "prefix": "DB_"}],
            "env": [
                {"name": "MODE", "value": "override"},
                {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
            ]
        }]}));
        let resolved = resolve(&pod, &fetched()).expect("resolves");
        let rewritten = resolved.rewritten.as_ref().expect("rewritten").get();
        let container = &rewritten.spec.as_ref().expect("spec").containers[0];
        assert!(container.env_from.is_none());
        assert_eq!(
            env_of(&resolved),
            vec![
                // A later env entry replaces the envFrom value in place.
                ("mode".to_string(), Some("fast".to_string())),
                // Not expanded: the '$' is escaped for the agent's $(VAR) expansion.
                ("price".to_string(), Some("$$(HOME)".to_string())),
                ("DB_password".to_string(), Some("s3cr3t".to_string())),
                ("DB_user".to_string(), Some("admin".to_string())),
                ("MODE".to_string(), Some("override".to_string())),
                ("PASS".to_string(), Some("s3cr3t".to_string())),
                ("NODE".to_string(), None),
            ]
        );
        // fieldRefs stay for the agent, which knows the pod and host IPs.
        let node = container
            .env
            .as_ref()
            .expect("env")
            .iter()
            .find(|v| v.name == "NODE");
        assert!(node.and_then(|v| v.value_from.as_ref()).is_some());
    }

    #[test]
    fn service_variables_come_first_and_the_containers_own_win() {
        let pod = pod(json!({
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [{
                "name": "c", "image": "busybox",
                "env": [
                    {"name": "WEB_SERVICE_PORT", "value": "8080"},
                    {"name": "URL", "value": "http://$(WEB_SERVICE_HOST)/"}
                ]
            }]
        }));
        let fetched = Fetched {
            service_env: Arc::new(BTreeMap::from([
                ("WEB_SERVICE_HOST".to_string(), "10.43.0.7".to_string()),
                ("WEB_SERVICE_PORT".to_string(), "80".to_string()),
            ])),
            ..fetched()
        };
        let resolved = resolve(&pod, &fetched).expect("resolves");
        assert_eq!(
            env_of(&resolved),
            vec![
                (
                    "WEB_SERVICE_HOST".to_string(),
                    Some("10.43.0.7".to_string())
                ),
                ("WEB_SERVICE_PORT".to_string(), Some("8080".to_string())),
                (
                    "URL".to_string(),
                    Some("http://$(WEB_SERVICE_HOST)/".to_string())
                ),
            ]
        );
        let rewritten = resolved.rewritten.as_ref().expect("rewritten").get();
        let spec = rewritten.spec.as_ref().expect("spec");
        let init_env = spec.init_containers.as_ref().expect("init")[0].env.as_ref();
        assert_eq!(init_env.map(Vec::len), Some(2), "{init_env:?}");
    }

    #[test]
    fn missing_objects_and_keys_say_what_the_kubelet_says() {
        let cases = [
            (
                json!({"envFrom": [{"configMapRef": {"name": "other"}}]}),
                "configmap \"other\" not found",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}]}),
                "secret \"gone\" not found",
            ),
            (
                json!({"env": [{"name": "A", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nokey"}}}]}),
                "couldn't find key nokey in ConfigMap shop/cfg",
            ),
        ];
        for (extra, message) in cases {
            let mut container = json!({"name": "c", "image": "busybox"});
            for (k, v) in extra.as_object().expect("object") {
                container[k] = v.clone();
            }
            let pod = pod(json!({"containers": [container]}));
            assert_eq!(
                resolve(&pod, &fetched()),
                Err(ResolveError::Missing(message.to_string()))
            );
        }
        let pod = pod(json!({"containers": [{"name": "c", "image": "busybox"}],
            "volumes": [{"name": "v", "configMap": {"name": "cfg", "items": [{"key": "nokey", "path": "p"}]}}]}));
        assert_eq!(
            resolve(&pod, &fetched()),
            Err(ResolveError::Missing(
                "configmap references non-existent config key: nokey".into()
            ))
        );
    }

    #[test]
    fn image_pull_secrets_give_logins_and_name_the_ones_that_cannot_be_used() {
        let pod = pod(json!({
            "imagePullSecrets": [{"name": "regcred"}, {"name": ""}, {"name": "gone"}, {"name": "creds"}],
            "containers": [{"name": "app", "image": "registry:5000/app"}]
        }));
        assert!(["regcred", "gone", "creds"]
            .iter()
            .all(|name| references(&pod).secrets.contains(*name)));
        // {"auths": {"registry:5000": {"username": "u", "password": "p"}}}
        let regcred: Secret = serde_json::from_value(json!({
            "metadata": {"name": "regcred"},
            "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": "eyJhdXRocyI6IHsicmVnaXN0cnk6NTAwMCI6IHsidXNlcm5hbWUiOiAidSIsICJwYXNzd29yZCI6ICJwIn19fQ=="}
        }))
        .expect("secret");
        let mut fetched = fetched();
        fetched.secrets.insert("regcred".into(), regcred);
        let resolved =
            resolve(&pod, &fetched).expect("a missing pull secret does not stop the pod");
        assert_eq!(
            *resolved.pull_credentials,
            [RegistryCredential {
                registry: "registry:5000".into(),
                username: "u".into(),
                password: "p".into()
            }]
        );
        assert_eq!(
            resolved.unusable_pull_secrets,
            [
                "gone".to_string(),
                "creds: is of type \"Opaque\", not kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg".into()
            ]
        );
    }

    #[test]
    fn volumes_become_files_with_modes() {
        let pod = pod(json!({
            "containers": [{"name": "c", "image": "busybox",
                "resources": {"limits": {"memory": "64Mi"}}}],
            "volumes": [
                {"name": "all", "configMap": {"name": "cfg"}},
                {"name": "some", "secret": {"secretName": "creds", "defaultMode": 0o400,
                    "items": [{"key": "password", "path": "db/pass"}, {"key": "user", "path": "user", "mode": 0o440}]}},
                {"name": "maybe", "configMap": {"name": "absent", "optional": true}},
                {"name": "info", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "note", "fieldRef": {"fieldPath": "metadata.annotations['note']"}},
                    {"path": "mem", "resourceFieldRef": {"containerName": "c", "resource": "limits.memory", "divisor": "1Mi"}}
                ]}},
                {"name": "scratch", "emptyDir": {}}
            ]
        }));
        let resolved = resolve(&pod, &fetched()).expect("resolves");
        let files = |name: &str| -> Vec<(String, String, u32)> {
            resolved.volumes[name]
                .iter()
                .map(|f| {
                    (
                        f.path.clone(),
                        String::from_utf8_lossy(&f.data.0).into_owned(),
                        f.mode,
                    )
                })
                .collect()
        };
        assert_eq!(
            files("all"),
            vec![
                ("bad=key".into(), "x".into(), 0o644),
                ("mode".into(), "fast".into(), 0o644),
                ("price".into(), "$(HOME)".into(), 0o644),
            ]
        );
        assert_eq!(
            files("some"),
            vec![
                ("db/pass".into(), "s3cr3t".into(), 0o400),
                ("user".into(), "admin".into(), 0o440)
            ]
        );
        assert!(files("maybe").is_empty());
        assert_eq!(
            files("info"),
            vec![
                ("labels".into(), "app=\"web\"\ntier=\"front\"".into(), 0o644),
                ("note".into(), "say \"hi\"\n".into(), 0o644),
                ("mem".into(), "64".into(), 0o644),
            ]
        );
        assert!(!resolved.volumes.contains_key("scratch"));
    }

    #[test]
    fn the_service_account_volume_takes_the_fetched_token() {
        // As the API server's ServiceAccount admission adds it (see the k3s fixture).
        let pod = pod(json!({
            "serviceAccountName": "builder",
            "containers": [{"name": "c", "image": "busybox"}],
            "volumes": [{"name": "kube-api-access-x1y2z", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ]}}]
        }));
        let refs = references(&pod);
        let spec = TokenSpec {
            service_account: "builder".into(),
            audience: None,
            expiration_secs: 3607,
        };
        assert_eq!(refs.tokens, BTreeSet::from([spec.clone()]));
        assert_eq!(
            refs.config_maps,
            BTreeSet::from(["kube-root-ca.crt".to_string()])
        );
        let mut objects = Fetched::default();
        assert!(
            matches!(resolve(&pod, &objects), Err(ResolveError::Missing(m)) if m.contains("token"))
        );
        objects.tokens.insert(spec, "eyJ.token".into());
        assert_eq!(
            resolve(&pod, &objects),
            Err(ResolveError::Missing(
                "configmap \"kube-root-ca.crt\" not found".into()
            ))
        );
        objects.config_maps.insert(
            "kube-root-ca.crt".into(),
            serde_json::from_value(json!({"data": {"ca.crt": "PEM"}})).expect("cm"),
        );
        let resolved = resolve(&pod, &objects).expect("resolves");
        let paths: Vec<(&str, &[u8])> = resolved.volumes["kube-api-access-x1y2z"]
            .iter()
            .map(|f| (f.path.as_str(), f.data.0.as_slice()))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("token", &b"eyJ.token"[..]),
                ("ca.crt", b"PEM"),
                ("namespace", b"shop")
            ]
        );
    }

    #[test]
    fn escaping_paths_and_bad_modes_are_refused() {
        for (path, mode) in [
            ("../etc/passwd", 0o644),
            ("/abs", 0o644),
            ("a//b", 0o644),
            ("ok", 0o7777),
        ] {
            let pod = pod(json!({"containers": [{"name": "c", "image": "busybox"}],
                "volumes": [{"name": "v", "configMap": {"name": "cfg", "items": [{"key": "mode", "path": path, "mode": mode}]}}]}));
            assert!(
                matches!(resolve(&pod, &fetched()), Err(ResolveError::Invalid { field, .. }) if field == "spec.volumes[0].configMap.items[0].path"),
                "{path} {mode:o}"
            );
        }
    }
}
